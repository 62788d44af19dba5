"""Redis Sentinel failover under load: master + replica + 3 sentinels on loopback (ops/redis_ha.py),
two real worker processes against the sandbox, the master SIGKILLed while jobs run.

Asked for: a replica is promoted; every job ends `done` within the bound, none stuck; each upload
linked exactly once (the sandbox counts links per uploadId); no worker exits. Printed (`-s`): the
time from the kill to the promotion, to the first step a worker completed after it, and to the
last job done:

    .venv/bin/pytest tests/test_sentinel_failover.py -q -s -p no:cacheprovider
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pytest

from ops.demo_files import random_file
from ops.processes import Child, stop_all
from ops.redis_ha import RedisHA
from ops.sandbox.launcher import SandboxProcess
from ops.stack import ping_workers, worker_argv
from producers.client import Uploads
from producers.config import SharedSettings

pytestmark = pytest.mark.slow

JOBS = 40
BOUND = 40.0  # seconds from the kill to every job done
API_KEY = "test-key-" + secrets.token_hex(8)
# Short sweeper timings, so a message or state write lost in the failover window is re-driven
# within the bound; short backoff for the steps that met the failover.
ENV = {
    "AWORK_SWEEPER_INTERVAL": "1",
    "AWORK_SWEEPER_IDLE": "10",
    "AWORK_SWEEPER_UNPUBLISHED": "3",
    "AWORK_LOCK_TTL_SECONDS": "6",
    "AWORK_HEARTBEAT_SECONDS": "1",
    "AWORK_RETRY_BASE_SECONDS": "0.3",
    "AWORK_RETRY_MAX_SECONDS": "2",
    "AWORK_MAX_ATTEMPTS": "8",
    "AWORK_SHUTDOWN_GRACE": "5",
}
LOG_LINE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): .*outcome=ok")


@dataclass
class HAFleet:
    root: Path
    ha: RedisHA
    sandbox: SandboxProcess
    env: dict[str, str]
    workers: list[Child] = field(default_factory=list)

    def entity(self) -> str:
        task = str(uuid.uuid4())
        self.sandbox.seed("tasks", task)
        return task


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HAFleet]:
    root = tmp_path_factory.mktemp("failover")
    with pytest.MonkeyPatch.context() as mp, RedisHA(root / "ha") as ha:
        sandbox = SandboxProcess(
            api_keys={API_KEY: "default"}, admin_token=secrets.token_hex(8), data_dir=root / "sandbox"
        )
        sandbox.start()
        env = {
            **ha.env,
            "STAGING_DIR": str(root / "staging"),
            "AWORK_API_URL": sandbox.api_url,
            "AWORK_API_KEY": API_KEY,
            "AWORK_UPLOAD_HOSTS": sandbox.upload_host,
            **ENV,
        }
        for name, value in env.items():  # this process (the producer, ping) and the workers
            mp.setenv(name, value)
        mp.delenv("AWORK_WORKSPACES_FILE", raising=False)
        f = HAFleet(root, ha, sandbox, env)
        try:
            for n in (1, 2):
                argv = worker_argv(4, f"w{n}-{uuid.uuid4().hex[:6]}@{socket.gethostname()}")
                log = root / "logs" / f"w{n}.log"
                f.workers.append(Child(f"worker-{n}", argv, dict(os.environ), log).start())
            deadline = time.monotonic() + 60
            while ping_workers(env) < len(f.workers):
                assert time.monotonic() < deadline, f"workers did not answer ping; logs in {root / 'logs'}"
                time.sleep(0.3)
            yield f
        finally:
            stop_all(f.workers, grace=10)
            sandbox.stop()


def first_step_after(log: Path, since: float) -> float | None:
    """Seconds from `since` (unix time) to the first step this worker completed after it."""
    for line in log.read_text(errors="replace").splitlines():
        m = LOG_LINE.match(line)
        if m:
            at = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            if at >= since:
                return at - since
    return None


def test_master_sigkill_mid_run(fleet: HAFleet, tmp_path: Path) -> None:
    fleet.sandbox.set_faults({"routes": {"blob": {"latency_ms": 200}, "link": {"latency_ms": 100}}})
    uploads = Uploads(SharedSettings.from_env())
    try:
        entities = [fleet.entity() for _ in range(JOBS)]
        jobs = [
            uploads.enqueue(random_file(tmp_path / f"f{i}.bin", 3000 + i), to=f"task:{e}")
            for i, e in enumerate(entities)
        ]
        # mid-run: some jobs done, the rest queued or in flight
        deadline = time.monotonic() + 30
        while sum(j.state.value == "done" for j in uploads.statuses(j.id for j in jobs)) < 3:
            assert time.monotonic() < deadline, "no job finished before the kill"
            time.sleep(0.05)
        ids = [j.id for j in jobs]
        done_at_kill = {j.id for j in uploads.statuses(ids) if j.state.value == "done"}
        killed_wall, killed = time.time(), time.monotonic()
        old = fleet.ha.kill_master()
        promoted: list[float] = []
        new: list[int] = []

        def watch() -> None:
            new.append(fleet.ha.wait_failover(old, timeout=BOUND))
            promoted.append(time.monotonic() - killed)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        # the first job to end after the kill, as a client sees it (its reads wait out the failover)
        first_done = None
        while first_done is None and time.monotonic() - killed < BOUND:
            if {j.id for j in uploads.statuses(ids) if j.state.value == "done"} - done_at_kill:
                first_done = time.monotonic() - killed
            else:
                time.sleep(0.05)
        watcher.join(BOUND)
        assert promoted and new[0] != old, "no replica was promoted"
        final = uploads.wait_many(ids, timeout=max(1.0, BOUND - (time.monotonic() - killed)))
        all_done = time.monotonic() - killed
        stats = fleet.sandbox.stats()
        stuck = [(j.id, j.state.value, j.error) for j in final if j.state.value != "done"]
        assert not stuck, f"jobs not done {BOUND:.0f} s after the kill: {stuck}; logs in {fleet.root}"
        for job in final:
            record = uploads.store.get(job.id) or {}
            assert stats["links"][record["upload_id"]] == 1, job.id
        assert first_done is not None
        assert all(w.alive() for w in fleet.workers), "no worker exits over a failover"
        firsts = [first_step_after(w.log_path, killed_wall) for w in fleet.workers if w.log_path]
        first_logged = min(f for f in firsts if f is not None)
        print(
            f"\nfailover: {JOBS} jobs ({len(done_at_kill)} done at the kill); after the master SIGKILL: "
            f"replica promoted {promoted[0]:.1f} s, first step logged ok {first_logged:.1f} s, first job "
            f"done (seen by a client) {first_done:.1f} s, all done {all_done:.1f} s",
            flush=True,
        )
    finally:
        uploads.close()
