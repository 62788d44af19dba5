"""Fair share on a real fleet: another workspace's backlog does not hold up a small upload,
priority and aging order a workspace's transfers, and a transfer lost with a killed worker
comes back under the fair share with nothing lost and nothing linked twice.

Real redis-server, real `celery -A workers worker` processes (2 x 2 threads: 4 transfer slots),
the sandbox pacing every PUT stream at about 500 KiB/s (`--latency-ms 20 --window-kib 10`), so
a 1 MiB transfer holds a slot for about 2 s. Workspaces: `default` (a) and `second` (b).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ops.demo_files import random_file
from producers.records import Job
from tests.fleet import FAST, Fleet, holder_of, wait_until

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    f = Fleet(
        tmp_path_factory.mktemp("fairness"),
        worker_count=2,
        concurrency=2,
        extra_env={
            **FAST,
            "AWORK_PRIORITY_AGING_SECONDS": "3",
            "AWORK_SINGLE_PUT_THRESHOLD": str(64 * MIB),  # one paced PUT per file
        },
        sandbox_args=["--latency-ms", "20", "--window-kib", "10"],
    ).start()
    yield f
    f.stop()


def enqueue(fleet: Fleet, tmp: Path, workspace: str, n: int, size: int, tag: str, **kw: str) -> list[Job]:
    entity = fleet.entity("tasks")
    files = [random_file(tmp / f"{tag}-{i}.bin", size) for i in range(n)]
    return [fleet.uploads.enqueue(f, to=f"task:{entity}", workspace=workspace, **kw) for f in files]


def not_done(fleet: Fleet, jobs: list[Job]) -> int:
    return sum(1 for j in fleet.uploads.statuses([j.id for j in jobs]) if j.state.value != "done")


def leases(fleet: Fleet, workspace: str) -> int:
    client = fleet.client()
    try:
        return int(client.zcard(f"awork:fair:lease:{workspace}"))
    finally:
        client.close()


def running_puts(fleet: Fleet, jobs: list[Job]) -> int:
    records = fleet.uploads.store.get_many([j.id for j in jobs])
    return sum(1 for r in records if r and r.get("running") == "put")


def assert_each_linked_once(fleet: Fleet, jobs: list[Job]) -> None:
    links = fleet.sandbox.stats()["links"]
    for job in jobs:
        record = fleet.record(job.id)
        assert record["state"] == "done", record
        assert links[record["upload_id"]] == 1


@pytest.mark.timing
def test_small_files_of_one_workspace_finish_while_anothers_backlog_is_large(
    fleet: Fleet, tmp_path: Path
) -> None:
    a_jobs = enqueue(fleet, tmp_path, "default", 24, MIB, "a")  # 6 rounds of 4 slots, ~12 s
    wait_until(lambda: running_puts(fleet, a_jobs) >= 4, 20, "a's transfers fill the fleet")
    b_jobs = enqueue(fleet, tmp_path, "second", 3, 16 * 1024, "b")
    started = time.monotonic()
    fleet.wait(b_jobs, timeout=40)
    b_seconds = time.monotonic() - started
    a_left = not_done(fleet, a_jobs)
    # b waited for at most one slot's turnover (a ~2 s transfer), not for a's backlog
    assert b_seconds < 6, f"b took {b_seconds:.1f} s"
    assert a_left >= 12, f"only {a_left} of a's 24 transfers were left when b's finished"
    fleet.wait(a_jobs, timeout=60)
    assert_each_linked_once(fleet, a_jobs + b_jobs)


def test_high_goes_before_bulk_and_bulk_ages(fleet: Fleet, tmp_path: Path) -> None:
    fill = enqueue(fleet, tmp_path, "default", 6, MIB, "fill")  # the 4 slots stay busy for ~4 s
    wait_until(lambda: running_puts(fleet, fill) >= 4, 20, "the fleet is full")
    bulk = enqueue(fleet, tmp_path, "default", 2, 64 * 1024, "bulk", priority="bulk")
    high = enqueue(fleet, tmp_path, "default", 2, 64 * 1024, "high", priority="high")
    # a bulk job that waited longer than the aging offset (3 s) goes before a newer high one
    old_bulk = enqueue(fleet, tmp_path, "default", 1, 64 * 1024, "old-bulk", priority="bulk")
    time.sleep(4)
    late_high = enqueue(fleet, tmp_path, "default", 1, 64 * 1024, "late-high", priority="high")
    everything = fill + bulk + high + old_bulk + late_high
    fleet.wait(everything, timeout=60)
    finished = {j.id: float(fleet.record(j.id)["finished_at"]) for j in everything}
    assert max(finished[j.id] for j in high) < min(finished[j.id] for j in bulk)
    assert finished[old_bulk[0].id] < finished[late_high[0].id]
    assert_each_linked_once(fleet, everything)


def test_a_transfer_lost_with_a_killed_worker_comes_back_under_the_fair_share(
    fleet: Fleet, tmp_path: Path
) -> None:
    a_jobs = enqueue(fleet, tmp_path, "default", 8, MIB, "ka")
    b_jobs = enqueue(fleet, tmp_path, "second", 4, MIB, "kb")
    wait_until(lambda: leases(fleet, "default") + leases(fleet, "second") >= 4, 20, "slots taken")
    victim = holder_of(fleet, b_jobs[0].id)
    victim.kill()
    everything = a_jobs + b_jobs
    fleet.wait(everything, timeout=90)
    assert_each_linked_once(fleet, everything)
    files = fleet.sandbox.stats()["files"]
    uploads = {fleet.record(j.id)["upload_id"] for j in everything}
    assert sum(1 for f in files if f.get("upload_id") in uploads) == len(everything)
    assert any(fleet.record(j.id).get("redrive_reason") for j in everything), "nothing was lost?"
    # the dead worker's slots lapsed: nothing is left holding a lease
    wait_until(lambda: leases(fleet, "default") + leases(fleet, "second") == 0, 30, "leases given back")
