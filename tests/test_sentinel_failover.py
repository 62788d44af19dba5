"""Redis Sentinel failover under load: master + replica + 3 sentinels on loopback (ops/redis_ha.py),
two real worker processes against the sandbox, the master SIGKILLed while jobs run.

Asked for: a replica is promoted; every job ends `done` within the bound, none stuck; each upload
linked exactly once (the sandbox counts links per uploadId); no worker exits. Printed (`-s`): the
time from the kill to the promotion, to the first step a worker completed after it, and to the
last job done:

    .venv/bin/pytest tests/test_sentinel_failover.py -q -s -p no:cacheprovider
"""

from __future__ import annotations

import secrets
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ops.demo_files import random_file
from ops.local_fleet import FleetOptions, LocalFleet, SandboxOptions
from ops.redis_ha import RedisHA
from tests.fleet import first_step_after

pytestmark = [pytest.mark.slow, pytest.mark.timing]

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


@dataclass
class HAFleet:
    ha: RedisHA
    fleet: LocalFleet

    def entity(self) -> str:
        task = str(uuid.uuid4())
        assert self.fleet.sandbox is not None
        self.fleet.sandbox.seed("tasks", task)
        return task


@pytest.fixture(scope="module")
def ha_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HAFleet]:
    root = tmp_path_factory.mktemp("failover")
    with pytest.MonkeyPatch.context() as mp, RedisHA(root / "ha") as ha:
        for name, value in ha.env.items():  # this process is a client too (producer, ping)
            mp.setenv(name, value)
        options = FleetOptions(
            root=root,
            workers=2,
            concurrency=4,
            env={**ha.env, **ENV},
            redis_url=ha.url,
            sandbox=SandboxOptions(api_keys={API_KEY: "default"}, admin_token=secrets.token_hex(8)),
        )
        with LocalFleet(options) as fleet:
            yield HAFleet(ha, fleet)




def test_master_sigkill_mid_run(ha_fleet: HAFleet, tmp_path: Path) -> None:
    fleet, ha = ha_fleet.fleet, ha_fleet.ha
    assert fleet.sandbox is not None
    fleet.sandbox.set_faults({"routes": {"blob": {"latency_ms": 200}, "link": {"latency_ms": 100}}})
    uploads = fleet.producer()
    try:
        entities = [ha_fleet.entity() for _ in range(JOBS)]
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
        old = ha.kill_master()
        promoted: list[float] = []
        new: list[int] = []

        def watch() -> None:
            new.append(ha.wait_failover(old, timeout=BOUND))
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
        assert not stuck, f"jobs not done {BOUND:.0f} s after the kill: {stuck}; logs in {fleet.logs}"
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
