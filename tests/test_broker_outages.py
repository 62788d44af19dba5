"""A worker never hangs: Redis restarts, dropped connections and a network black hole
under load, with three real workers that reach Redis through a TCP proxy (ops/tcp_proxy.py).

Each round enqueues 30 small uploads (the sandbox slows PUTs and links a little, so steps are in
flight), breaks the broker half a second later, and then asks for:

- every worker answering a ping within 30 s of Redis being back (after a black hole: within the
  broker socket timeout + 30 s of the heal);
- every job of the round `done` within the same bound, each upload linked exactly once.

The sweeper runs with its production stall timeout (45 s), so a step held across the outage
that comes back within 30 s comes back through the worker that held it (workers/resume.py),
not through the sweeper. Its idle rule is shortened (15 s) as the net for the one case no
worker can see: a message BRPOP took from its queue while the reply to the worker was lost.

The short form runs in `make test`; the long form (its figures are in ops/bench/README.md, "Broker outages"):

    AWORK_OUTAGE_RESTARTS=20 AWORK_OUTAGE_DROPS=20 AWORK_OUTAGE_HOLES=3 \\
        .venv/bin/pytest tests/test_broker_outages.py -q -s -p no:cacheprovider

`-s` shows one line per round: the time from Redis back to each worker's first completed step.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from ops.demo_files import random_file
from ops.local_fleet import ping_workers
from producers.broker import BROKER_SOCKET_TIMEOUT_SECONDS
from tests.fleet import Fleet, wait_until

pytestmark = pytest.mark.slow

RESTARTS = int(os.environ.get("AWORK_OUTAGE_RESTARTS", "3"))
DROPS = int(os.environ.get("AWORK_OUTAGE_DROPS", "1"))
HOLES = int(os.environ.get("AWORK_OUTAGE_HOLES", "1"))
JOBS_PER_ROUND = 30
BOUND = 30.0
HOLE_SECONDS = 30.0
ENV = {
    "AWORK_SWEEPER_INTERVAL": "2",
    "AWORK_SWEEPER_IDLE": "15",
    "AWORK_SHUTDOWN_GRACE": "5",
}
LOG_LINE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): .*outcome=ok")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    f = Fleet(
        tmp_path_factory.mktemp("outages"),
        worker_count=3,
        concurrency=4,
        extra_env=ENV,
        sandbox_args=["--seed", "1212"],
        appendfsync="always",
        via_proxy=True,
    ).start()
    f.sandbox.set_faults({"routes": {"blob": {"latency_ms": 300}, "link": {"latency_ms": 100}}})
    yield f
    f.stop()


def first_step_after(log: Path, since: float) -> float | None:
    """Seconds from `since` (unix time) to the first step this worker completed after it."""
    for line in log.read_text(errors="replace").splitlines():
        m = LOG_LINE.match(line)
        if m:
            at = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            if at >= since:
                return at - since
    return None


def one_round(fleet: Fleet, tmp_path: Path, fault: str, n: int) -> str:
    assert fleet.redis is not None and fleet.proxy is not None
    entities = [fleet.entity("tasks") for _ in range(JOBS_PER_ROUND)]
    jobs = [
        fleet.uploads.enqueue(random_file(tmp_path / f"{fault}-{n}-{i}.bin", 4000 + i), to=f"task:{e}")
        for i, e in enumerate(entities)
    ]
    time.sleep(0.5)
    bound = BOUND
    if fault == "restart":
        fleet.redis.restart()  # SIGKILL, then start on the same AOF file
    elif fault == "drop":
        fleet.proxy.drop()
    else:
        fleet.proxy.black_hole()
        time.sleep(HOLE_SECONDS)
        fleet.proxy.heal()
        bound = BROKER_SOCKET_TIMEOUT_SECONDS + BOUND
    back, back_wall = time.monotonic(), time.time()
    workers = [w for w in fleet.workers if w.alive()]
    every = f"{fault} {n}: every worker answers ping"
    wait_until(lambda: ping_workers(fleet.env) >= len(workers), bound, every)
    pinged = time.monotonic() - back
    final = fleet.wait(jobs, timeout=max(1.0, bound - (time.monotonic() - back)))
    done_in = time.monotonic() - back
    stats = fleet.sandbox.stats()
    for job, entity in zip(final, entities, strict=True):
        assert job.state.value == "done", (fault, n, job.id, job.state, job.error)
        assert len(fleet.files_of(entity)) == 1, (fault, n, job.id)
        assert stats["links"][fleet.record(job.id)["upload_id"]] == 1, (fault, n, job.id)
    assert all(w.alive() for w in workers), "no worker exits over a broker outage"
    firsts = [first_step_after(w.log_path, back_wall) for w in workers if w.log_path is not None]
    shown = ", ".join("-" if f is None else f"{f:.1f}" for f in firsts)
    return f"{fault} {n}: ping {pinged:.1f} s, all done {done_in:.1f} s, first step per worker [{shown}] s"


def test_redis_restarts_drops_and_a_black_hole_under_load(fleet: Fleet, tmp_path: Path) -> None:
    plan = ["restart"] * RESTARTS + ["drop"] * DROPS + ["hole"] * HOLES
    for n, fault in enumerate(plan):
        print(one_round(fleet, tmp_path, fault, n), flush=True)
