"""End to end against the sandbox with real workers: on_existing, new_version_of, via awork,
and a version call that times out after awork applied it (one version, not two)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from producers.client import Uploads
from producers.contract import SpecError
from tests.file_server import Files, file_server
from tests.fleet import Fleet

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    f = Fleet(
        tmp_path_factory.mktemp("fleet"),
        worker_count=1,
        extra_env={"AWORK_SANDBOX_TEST_MODE": "1", "AWORK_READ_TIMEOUT": "3"},
    ).start()
    yield f
    f.stop()


@pytest.fixture(scope="module")
def up(fleet: Fleet) -> Iterator[Uploads]:
    """A producer in the sandbox test mode (loopback sources may go via awork)."""
    u = Uploads(replace(fleet.uploads.settings, sandbox_test_mode=True))
    yield u
    u.close()


@pytest.fixture(scope="module")
def files() -> Iterator[Files]:
    with file_server() as f:
        yield f


@pytest.fixture(autouse=True)
def _no_faults(fleet: Fleet) -> Iterator[None]:
    yield
    fleet.sandbox.set_faults({"routes": {r: None for r in ("versions", "byurl", "list")}})


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _stored(fleet: Fleet, entity_id: str) -> list[dict[str, Any]]:
    return fleet.files_of(entity_id)


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def test_version_creates_then_adds_versions(fleet: Fleet, up: Uploads, tmp_path: Path) -> None:
    task = fleet.entity("tasks")
    f = _write(tmp_path / "report.csv", b"night 1\n" * 100)
    first = up.wait(up.enqueue(f, to=f"task:{task}", on_existing="version").id, timeout=60)
    assert first.state.value == "done" and first.outcome is None, first.error
    _write(f, b"night 2, longer\n" * 100)
    second = up.wait(up.enqueue(f, to=f"task:{task}", on_existing="version").id, timeout=60)
    assert second.state.value == "done", second.error
    assert second.outcome == "version" and second.file_id == first.file_id
    (stored,) = _stored(fleet, task)
    want = [_md5(b"night 1\n" * 100), _md5(b"night 2, longer\n" * 100)]
    assert [v["md5"] for v in stored["versions"]] == want
    assert up.store.get(second.id)["size_verified"] == "1"  # type: ignore[index]


def test_same_name_at_once_never_makes_two_files(fleet: Fleet, up: Uploads, tmp_path: Path) -> None:
    task = fleet.entity("tasks")
    paths = [_write(tmp_path / f"{n}.csv", f"run {n}\n".encode() * (50 + n)) for n in range(4)]
    jobs = [up.enqueue(p, to=f"task:{task}", name="export.csv", on_existing="version") for p in paths]
    final = up.wait_many([j.id for j in jobs], timeout=120)
    assert all(j.state.value == "done" for j in final), [j.error for j in final]
    (stored,) = _stored(fleet, task)  # one file, whatever the order
    assert len(stored["versions"]) == 4
    assert sorted(j.outcome or "new" for j in final) == ["new", "version", "version", "version"]


def test_skip_same_name_and_size(fleet: Fleet, up: Uploads, tmp_path: Path) -> None:
    project = fleet.entity("projects")
    f = _write(tmp_path / "plan.txt", b"the plan")
    first = up.wait(up.enqueue(f, to=f"project:{project}", on_existing="skip").id, timeout=60)
    assert first.state.value == "done" and first.outcome is None
    again = up.wait(up.enqueue(f, to=f"project:{project}", on_existing="skip").id, timeout=60)
    assert again.state.value == "done" and again.outcome == "skipped" and again.file_id == first.file_id
    assert len(_stored(fleet, project)) == 1
    _write(f, b"the new plan")  # another size: not the same file, so uploaded
    third = up.wait(up.enqueue(f, to=f"project:{project}", on_existing="skip").id, timeout=60)
    assert third.outcome is None and third.file_id != first.file_id
    assert len(_stored(fleet, project)) == 2


def test_new_version_of_a_file_id_on_a_multipart_entity(fleet: Fleet, up: Uploads, tmp_path: Path) -> None:
    company = fleet.entity("companies")
    first = up.wait(up.enqueue(_write(tmp_path / "a.pdf", b"v1"), to=f"company:{company}").id, timeout=60)
    assert first.file_id
    v2 = _write(tmp_path / "other-name.pdf", b"version 2")
    job = up.wait(up.enqueue(v2, to=f"company:{company}", new_version_of=first.file_id).id, timeout=60)
    assert job.state.value == "done" and job.outcome == "version" and job.file_id == first.file_id
    (stored,) = _stored(fleet, company)
    assert [v["size"] for v in stored["versions"]] == [2, 9]


def test_version_call_times_out_after_awork_applied_it(fleet: Fleet, up: Uploads, tmp_path: Path) -> None:
    task = fleet.entity("tasks")
    f = _write(tmp_path / "r.csv", b"first")
    first = up.wait(up.enqueue(f, to=f"task:{task}").id, timeout=60)
    before = fleet.sandbox.stats()["faults_injected"]["stall_after"]
    # every versions call takes effect, then its answer is held past the worker's 3 s read timeout
    fleet.sandbox.set_faults({"routes": {"versions": {"stall_after": 1.0}}, "stall_after_s": 6})
    _write(f, b"second version")
    job = up.wait(up.enqueue(f, to=f"task:{task}", new_version_of=first.file_id).id, timeout=90)
    assert job.state.value == "done" and job.outcome == "version", job.error
    (stored,) = _stored(fleet, task)
    assert len(stored["versions"]) == 2, stored["versions"]  # one new version, not two
    assert stored["versions"][1]["md5"] == _md5(b"second version")
    assert fleet.sandbox.stats()["faults_injected"]["stall_after"] == before + 1
    assert up.store.get(job.id)["reconciled"] == "1"  # type: ignore[index]


def test_via_awork_fetches_without_the_workers(fleet: Fleet, up: Uploads, files: Files) -> None:
    task = fleet.entity("tasks")
    data = b"exported by a public server\n" * 500
    files.bodies["export.csv"] = data
    generated = fleet.sandbox.stats()["requests"].get("POST /api/v1/files/generateuploadurl", 0)
    job = up.wait(up.enqueue(files.url("export.csv"), to=f"task:{task}", via="awork").id, timeout=60)
    assert job.state.value == "done", job.error
    (stored,) = _stored(fleet, task)
    assert stored["md5"] == _md5(data) and stored["id"] == job.file_id
    assert files.gets.count("export.csv") == 1  # awork (the sandbox) fetched it, once
    assert fleet.sandbox.stats()["requests"].get("POST /api/v1/files/generateuploadurl", 0) == generated


def test_via_awork_answer_lost_after_fetch_is_one_file(fleet: Fleet, up: Uploads, files: Files) -> None:
    task = fleet.entity("tasks")
    files.bodies["once.csv"] = b"just once\n" * 100
    fleet.sandbox.set_faults({"routes": {"byurl": {"drop_after": 1.0}}})
    job = up.enqueue(files.url("once.csv"), to=f"task:{task}", via="awork")
    final = up.wait(job.id, timeout=60)
    assert final.state.value == "done", final.error
    assert len(_stored(fleet, task)) == 1
    assert up.store.get(job.id)["reconciled"] == "1"  # type: ignore[index]


def test_via_awork_refusals_name_the_field(fleet: Fleet, up: Uploads, files: Files, tmp_path: Path) -> None:
    task = fleet.entity("tasks")
    files.head_sizes["huge.bin"] = 100_000_001
    with pytest.raises(SpecError, match=r"^source: via awork: 100000001 bytes .* over awork's 100000000"):
        up.enqueue(files.url("huge.bin"), to=f"task:{task}", via="awork")
    with pytest.raises(SpecError, match=r"^source: via awork: host 127.0.0.1:\d+ is not public"):
        fleet.uploads.enqueue(files.url("export.csv"), to=f"task:{task}", via="awork")  # test mode off
    with pytest.raises(SpecError, match=r"^source: via awork: host 10.1.2.3:80 is not public"):
        up.enqueue("http://10.1.2.3/x.csv", to=f"task:{task}", via="awork")
    with pytest.raises(SpecError, match=r"^via: awork fetches http\(s\) URLs only"):
        up.enqueue(_write(tmp_path / "x.txt", b"x"), to=f"task:{task}", via="awork")
    assert up.jobs(limit=1000) == [j for j in up.jobs(limit=1000) if j.target != f"task:{task}"]


def test_crafted_version_and_byurl_records_are_checked(
    fleet: Fleet, up: Uploads, files: Files, tmp_path: Path
) -> None:
    """A record written straight into Redis with a spoofing name fails `record-invalid` in the
    version and byurl steps too, naming the field; awork never sees the name."""
    task = fleet.entity("tasks")
    first = up.wait(up.enqueue(_write(tmp_path / "r.csv", b"v1"), to=f"task:{task}").id, timeout=60)
    staged = _write(Path(fleet.env["STAGING_DIR"]) / "spoof-version.txt", b"version 2")
    files.bodies["spoof.csv"] = b"fetched by awork"
    spoof = "invoice\u202efdp.exe"
    version = fleet.plant_job(
        "version",
        target=f"task:{task}",
        file_name=spoof,
        source=str(staged),
        new_version_of=first.file_id or "",
        flow="version",
    )
    byurl = fleet.plant_job(
        "byurl",
        target=f"task:{task}",
        file_name=spoof,
        source_kind="url",
        source=files.url("spoof.csv"),
        via="awork",
        flow="byurl",
    )
    for job in up.wait_many([version["id"], byurl["id"]], timeout=60):
        assert job.state.value == "failed" and job.error is not None, job
        assert job.error.code == "record-invalid" and "file_name" in (job.error.description or "")
    (stored,) = _stored(fleet, task)
    assert len(stored["versions"]) == 1 and files.gets.count("spoof.csv") == 0
