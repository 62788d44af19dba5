"""The liveness watchdog (workers/liveness.py): a worker whose consumer loop stops turning ends
itself with its stacks in its log, and its step runs again on another worker."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ops.demo_files import random_file
from tests.fleet import FAST, Fleet, holder_of, wait_until
from workers import liveness
from workers.liveness import EXIT_CODE, Heartbeat, LivenessSettings

# timing bounds: `make test` runs these one at a time (see tests/run_suite.sh)
pytestmark = pytest.mark.timing

LIMIT = 6.0


def test_the_heartbeat_is_overdue_only_past_its_limit() -> None:
    beat = Heartbeat()
    beat.set_consuming(True)
    now = beat.last_tick
    assert not beat.overdue(LIMIT, now + LIMIT - 0.1)
    assert beat.overdue(LIMIT, now + LIMIT + 0.1)
    beat.set_consuming(False)  # reconnecting: each attempt is bounded, so a longer allowance
    now = beat.last_tick
    assert not beat.overdue(LIMIT, now + LIMIT + 0.1)
    assert beat.overdue(LIMIT, now + LIMIT * liveness.RECONNECT_FACTOR + 0.1)


def test_settings_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(liveness.LIVENESS_ENV, "-1")
    with pytest.raises(ValueError, match=liveness.LIVENESS_ENV):
        LivenessSettings.from_env()
    monkeypatch.setenv(liveness.LIVENESS_ENV, "soon")
    with pytest.raises(ValueError, match=liveness.LIVENESS_ENV):
        LivenessSettings.from_env()
    monkeypatch.delenv(liveness.LIVENESS_ENV)
    assert LivenessSettings.from_env().seconds == liveness.DEFAULT_LIVENESS_SECONDS


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("liveness")
    f = Fleet(root, worker_count=0, concurrency=4, extra_env={**FAST, liveness.LIVENESS_ENV: str(LIMIT)})
    f.start()
    for n in (1, 2):
        f.add_worker(n, env={liveness.BLOCK_LOOP_ENV: str(root / f"block-{n}")})
    f.wait_ready()
    yield f
    f.stop()


def test_a_worker_whose_loop_hangs_exits_and_its_step_runs_elsewhere(fleet: Fleet, tmp_path: Path) -> None:
    fleet.sandbox.set_faults({"routes": {"blob": {"latency_ms": 30_000}}})
    entity = fleet.entity("tasks")
    job = fleet.uploads.enqueue(random_file(tmp_path / "held.bin", 20_000), to=f"task:{entity}")
    wait_until(lambda: fleet.record(job.id).get("running") == "put", 30, "put running")
    victim = holder_of(fleet, job.id)
    fleet.sandbox.set_faults({"routes": {"blob": {"latency_ms": 0}}})
    n = victim.name.split("-")[1]
    (fleet.root / f"block-{n}").touch()  # the test hook: the next tick blocks the consumer loop
    blocked = time.monotonic()
    assert victim.proc is not None
    code = victim.proc.wait(LIMIT + 5 + 5)
    exited_in = time.monotonic() - blocked
    assert code == EXIT_CODE
    assert exited_in <= LIMIT + 5, exited_in
    assert victim.log_path is not None
    log = victim.log_path.read_text(errors="replace")
    assert "the consumer loop has not ticked" in log
    assert "liveness: thread stacks" in log and "MainThread" in log and "in _tick" in log
    (final,) = fleet.wait([job], timeout=60)
    assert final.state.value == "done", final.error
    record = fleet.record(job.id)
    assert len(fleet.files_of(entity)) == 1
    assert fleet.sandbox.stats()["links"][record["upload_id"]] == 1
