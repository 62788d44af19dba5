"""`awork-uploads sync` end to end against the sandbox with real workers."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from producers.sync import FolderSync
from tests.fleet import Fleet, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    f = Fleet(tmp_path_factory.mktemp("fleet"), worker_count=1).start()
    yield f
    f.stop()


def _cli(fleet: Fleet, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "producers.cli", "sync", *args],
        env=fleet.env, capture_output=True, text=True, timeout=timeout,
    )


def _summary(proc: subprocess.CompletedProcess[str]) -> dict[str, int]:
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def test_sync_uploads_then_nothing_then_one_version(fleet: Fleet, tmp_path: Path) -> None:
    task = fleet.entity("tasks")
    folder = tmp_path / "exports"
    folder.mkdir()
    for n in range(3):
        (folder / f"export-{n}.csv").write_bytes(f"rows {n}\n".encode() * (100 + n))
    (folder / ".hidden").write_bytes(b"never synced")

    dry = _cli(fleet, str(folder), "--to", f"task:{task}", "--dry-run", "--json")
    assert _summary(dry)["uploaded"] == 3 and "upload    export-0.csv" in dry.stdout
    assert fleet.files_of(task) == []  # a dry run enqueues nothing

    first = _summary(_cli(fleet, str(folder), "--to", f"task:{task}", "--json"))
    assert first == {"uploaded": 3, "versions": 0, "unchanged": 0, "pending": 0, "failed": 0}
    stored = {f["file_name"]: f for f in fleet.files_of(task)}
    assert sorted(stored) == ["export-0.csv", "export-1.csv", "export-2.csv"]

    second = _summary(_cli(fleet, str(folder), "--to", f"task:{task}", "--json"))
    assert second == {"uploaded": 0, "versions": 0, "unchanged": 3, "pending": 0, "failed": 0}

    changed = b"rows 1, re-rendered\n" * 90
    (folder / "export-1.csv").write_bytes(changed)
    third = _summary(_cli(fleet, str(folder), "--to", f"task:{task}", "--json"))
    assert third == {"uploaded": 0, "versions": 1, "unchanged": 2, "pending": 0, "failed": 0}
    after = {f["file_name"]: f for f in fleet.files_of(task)}
    assert len(after) == 3 and sum(len(f["versions"]) for f in after.values()) == 4
    assert after["export-1.csv"]["id"] == stored["export-1.csv"]["id"]
    assert after["export-1.csv"]["versions"][-1]["md5"] == hashlib.md5(changed).hexdigest()


def test_same_size_change_is_found_by_md5(fleet: Fleet, tmp_path: Path) -> None:
    project = fleet.entity("projects")
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "a.txt").write_bytes(b"aaaa")
    sync = FolderSync(fleet.uploads, folder, f"project:{project}", timeout=60, say=lambda _: None)
    assert sync.run().summary()["uploaded"] == 1
    (folder / "a.txt").write_bytes(b"bbbb")  # same size, other bytes
    result = sync.run()
    assert result.summary()["versions"] == 1 and not result.failed
    (stored,) = fleet.files_of(project)
    assert [v["md5"] for v in stored["versions"]] == [hashlib.md5(b"aaaa").hexdigest(),
                                                      hashlib.md5(b"bbbb").hexdigest()]


def test_sync_refuses_delete_missing_yes(fleet: Fleet, tmp_path: Path) -> None:
    proc = _cli(fleet, str(tmp_path), "--to", f"task:{fleet.entity('tasks')}", "--delete-missing", "yes")
    assert proc.returncode == 2 and "delete_missing: only 'no' is supported" in proc.stderr


def test_watch_picks_up_a_new_file_within_seconds(fleet: Fleet, tmp_path: Path) -> None:
    task = fleet.entity("tasks")
    folder = tmp_path / "watched"
    folder.mkdir()
    (folder / "first.txt").write_bytes(b"there before")
    log = (tmp_path / "watch.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "producers.cli", "sync", str(folder), "--to", f"task:{task}", "--watch",
         "--debounce", "300", "--json"],
        env=fleet.env, stdout=log, stderr=subprocess.STDOUT, text=True,
    )
    try:
        wait_until(lambda: len(fleet.files_of(task)) == 1, timeout=30, what="the initial run")
        assert len(fleet.files_of(task)) == 1, (tmp_path / "watch.log").read_text()
        started = time.monotonic()
        (folder / "new.txt").write_bytes(b"arrived later")
        wait_until(lambda: len(fleet.files_of(task)) == 2, timeout=20, what="the new file", interval=0.1)
        took = time.monotonic() - started
        names = sorted(f["file_name"] for f in fleet.files_of(task))
        assert names == ["first.txt", "new.txt"], (tmp_path / "watch.log").read_text()
        assert took < 15
        print(f"--watch: new file on the task {took:.2f} s after it was written")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()
