"""Large files through the whole pipeline: sizes around the block threshold arrive byte-exact,
progress reaches the job record (and Flower, as a PROGRESS state) while a PUT runs, and a worker
SIGKILLed half-way through a multi-block upload is resumed elsewhere without resending the
blocks the sandbox acknowledged.

Small thresholds stand in for the defaults (64 MiB threshold, 8 MiB blocks) to keep files small.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ops.demo_files import random_file
from ops.flower import FlowerProcess
from ops.processes import Child
from producers.block_digests import sidecar_path
from producers.contract import TASK_PUT_FILE
from producers.records import Job
from tests.fleet import FAST, Fleet, holder_of, wait_until
from workers.block_journal import RedisBlockJournal

pytestmark = pytest.mark.slow

THRESHOLD = 1024 * 1024
BLOCK = 256 * 1024
SETTINGS = {
    **FAST,
    "AWORK_SINGLE_PUT_THRESHOLD": str(THRESHOLD),
    "AWORK_BLOCK_SIZE": str(BLOCK),
    "AWORK_PARALLEL_BLOCKS": "2",
}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    f = Fleet(tmp_path_factory.mktemp("large"), worker_count=2, concurrency=4, extra_env=SETTINGS).start()
    yield f
    f.stop()


def md5_hex(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("size", "mode"),
    [(THRESHOLD, "single"), (THRESHOLD - 1, "single"), (THRESHOLD + 1, "blocks"), (5 * BLOCK + 7, "blocks")],
)
def test_sizes_around_the_threshold_arrive_byte_exact(
    fleet: Fleet, tmp_path: Path, size: int, mode: str
) -> None:
    entity = fleet.entity("projects")
    f = random_file(tmp_path / f"f{size}.bin", size)
    job = fleet.uploads.enqueue(f, to=f"project:{entity}")
    (final,) = fleet.wait([job], timeout=60)
    assert final.state.value == "done", final.error
    record = fleet.record(final.id)
    assert record["put_mode"] == mode
    # staging hashed the blocks (same settings as the workers), so the worker sent them unhashed
    assert record["put_block_md5s"] == ("staging" if mode == "blocks" else "")
    assert not sidecar_path(Path(fleet.env["STAGING_DIR"]), job.id).exists()  # gone with the job
    (stored,) = fleet.files_of(entity)
    assert stored["size"] == size and stored["md5"] == md5_hex(f)
    if mode == "blocks":
        blocks = fleet.sandbox.stats()["blocks"][record["upload_id"]]
        assert len(blocks) == -(-size // BLOCK)


def _slow_block_upload_midway(fleet: Fleet, path: Path) -> tuple[str, Path, Job, RedisBlockJournal, Child]:
    """A 16-block upload slowed by blob latency (the caller resets it), caught after 4 acked
    blocks: (entity, file, job, its block journal, the worker holding it)."""
    fleet.sandbox.set_faults({"routes": {"blob": {"latency_ms": 400}}})
    entity = fleet.entity("documents")
    f = random_file(path, 16 * BLOCK)  # 16 blocks, 2 in flight: ~3.2 s
    job = fleet.uploads.enqueue(f, to=f"document:{entity}")
    journal = RedisBlockJournal(fleet.client(), job.id)
    wait_until(lambda: len(journal.acked()) >= 4, 30, "four blocks acknowledged")
    return entity, f, job, journal, holder_of(fleet, job.id)


def test_sigkill_mid_block_upload_resumes_without_resending_acked_blocks(
    fleet: Fleet, tmp_path: Path
) -> None:
    try:
        entity, f, job, journal, victim = _slow_block_upload_midway(fleet, tmp_path / "video.bin")
        seen = fleet.record(job.id)
        victim.kill()
        acked_before_kill = set(journal.acked())
        # byte progress reached the record while the PUT was running
        assert 0 < int(seen.get("bytes_sent") or 0) < f.stat().st_size
        fleet.sandbox.set_faults({"routes": {"blob": {"latency_ms": 0}}})
        (final,) = fleet.wait([job], timeout=120)
        assert final.state.value == "done", final.error
        record = fleet.record(job.id)
        assert record["crashes_put"] == "1"
        stats = fleet.sandbox.stats()
        puts = stats["blocks"][record["upload_id"]]
        assert len(puts) == 16
        for block_id in acked_before_kill:
            assert puts[block_id] == 1, f"acknowledged block {block_id} was sent again"
        (stored,) = fleet.files_of(entity)
        assert stored["md5"] == md5_hex(f)
        assert stats["links"][record["upload_id"]] == 1
    finally:
        fleet.sandbox.set_faults({"routes": {"blob": {"latency_ms": 0}}})
        for child in [w for w in fleet.workers if not w.alive()]:
            fleet.restart(child)
        time.sleep(0.1)


def test_flower_shows_a_running_put_file_as_progress(fleet: Fleet, tmp_path: Path) -> None:
    """The byte progress events make Flower show the running step in a custom PROGRESS state."""
    flower = FlowerProcess(
        {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "REDIS_URL": fleet.redis.url},
        basic_auth="operator:progress-test",
        log_path=tmp_path / "flower.log",
    ).start(timeout=60)
    fleet.sandbox.set_faults({"routes": {"blob": {"latency_ms": 300}}})
    try:
        # Flower's event consumer binds a moment after it answers: wait until it sees a publish
        warmup = random_file(tmp_path / "warmup.bin", 1024)
        fleet.uploads.enqueue(warmup, to=f"task:{fleet.entity('tasks')}")
        flower.wait_for_tasks(lambda tasks: bool(tasks), timeout=30)
        entity = fleet.entity("documents")
        f = random_file(tmp_path / "progress.bin", 24 * BLOCK)  # 24 blocks, 2 in flight: ~3.6 s
        job = fleet.uploads.enqueue(f, to=f"document:{entity}")

        def put_file_in(state: str) -> Callable[[dict[str, dict[str, object]]], bool]:
            return lambda tasks: any(
                t.get("name") == TASK_PUT_FILE and t.get("state") == state and job.id in str(t.get("kwargs"))
                for t in tasks.values()
            )

        def result_of_put_file(tasks: dict[str, dict[str, object]]) -> str:
            (task,) = [
                t for t in tasks.values() if t.get("name") == TASK_PUT_FILE and job.id in str(t["kwargs"])
            ]
            return str(task["result"])

        running = flower.wait_for_tasks(put_file_in("PROGRESS"), timeout=30)
        # the byte figures, as Flower shows them on the task's page
        assert f"'bytes_total': {f.stat().st_size}" in result_of_put_file(running)
        fleet.sandbox.set_faults({"routes": {"blob": {"latency_ms": 0}}})
        (final,) = fleet.wait([job], timeout=60)
        assert final.state.value == "done", final.error
        # once the step is over, Flower moves on from PROGRESS to SUCCESS, with the step's result
        done = flower.wait_for_tasks(put_file_in("SUCCESS"), timeout=30)
        assert "'mode': 'blocks'" in result_of_put_file(done) and "bytes_sent" not in result_of_put_file(done)
    finally:
        fleet.sandbox.set_faults({"routes": {"blob": {"latency_ms": 0}}})
        flower.stop()


def test_a_worker_frozen_mid_upload_does_not_commit_after_another_took_over(
    fleet: Fleet, tmp_path: Path
) -> None:
    """SIGSTOP (a paused VM or container) past the lock TTL: another worker finishes the job;
    when the frozen one wakes, its fence stops it before it commits the blob a second time."""
    victim = None
    try:
        entity, f, job, _, victim = _slow_block_upload_midway(fleet, tmp_path / "frozen.bin")
        victim.signal(signal.SIGSTOP)
        fleet.sandbox.set_faults({"routes": {"blob": {"latency_ms": 0}}})
        (final,) = fleet.wait([job], timeout=120)  # taken over once the lock lapsed
        assert final.state.value == "done", final.error
        upload_id = fleet.record(job.id)["upload_id"]
        assert fleet.sandbox.stats()["uploads"][upload_id]["blob_puts"] == 1
        assert victim.log_path is not None
        log_path = victim.log_path
        seen = log_path.stat().st_size
        victim.signal(signal.SIGCONT)
        woken: list[str] = []

        def put_ended() -> bool:
            with log_path.open(errors="replace") as log:
                log.seek(seen)
                woken[:] = [line for line in log if f"job={job.id}" in line and "step put " in line]
            return bool(woken)

        wait_until(put_ended, 30, "the woken worker's put step to end")
        stats = fleet.sandbox.stats()
        assert stats["uploads"][upload_id]["blob_puts"] == 1  # no second commit
        assert "reason=lease-lost" in woken[0], woken
        assert stats["links"][upload_id] == 1
        (stored,) = fleet.files_of(entity)
        assert stored["md5"] == md5_hex(f)
        assert fleet.record(job.id)["state"] == "done"
    finally:
        fleet.sandbox.set_faults({"routes": {"blob": {"latency_ms": 0}}})
        if victim is not None:
            victim.signal(signal.SIGCONT)
