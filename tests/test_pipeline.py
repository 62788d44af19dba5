"""End to end: producers -> Redis -> real worker processes -> the sandbox over loopback HTTP."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ops.demo_files import png_file, random_file
from tests.fleet import Fleet, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    f = Fleet(tmp_path_factory.mktemp("fleet")).start()
    yield f
    f.stop()


@pytest.fixture(autouse=True)
def _no_faults(fleet: Fleet) -> Iterator[None]:
    yield
    fleet.sandbox.set_faults(
        {
            "routes": {
                r: {"500": 0, "503": 0, "429": 0, "drop": 0, "latency_ms": 0}
                for r in ("*", "generate", "link", "image_link", "multipart", "list", "blob")
            },
            "latency_ms": 0,
            "jitter_ms": 0,
            "upload_url_lifetime_s": 900,
        }
    )


def md5_hex(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_every_target_kind_end_to_end(fleet: Fleet, tmp_path: Path) -> None:
    cases: list[tuple[str, str, Path]] = []
    for kind, plural in (
        ("task", "tasks"),
        ("project", "projects"),
        ("document", "documents"),
        ("tasktemplate", "tasktemplates"),
        ("company", "companies"),
        ("user", "users"),
        ("workspace", "workspaces"),
        ("projecttemplate", "projecttemplates"),
    ):
        entity = fleet.entity(plural)
        f = random_file(tmp_path / f"{kind}.bin", 50_000 + len(cases) * 1111)
        cases.append((f"{kind}:{entity}", entity, f))
    for name in ("projects", "users", "companies", "contactpersons", "projecttemplates", "workspaces"):
        entity = fleet.entity(name)
        cases.append((f"image:{name}/{entity}", entity, png_file(tmp_path / f"{name}.png", 20, 30)))
    jobs = [fleet.uploads.enqueue(path, to=to, description=f"for {to}") for to, _, path in cases]
    final = fleet.wait(jobs, timeout=90)
    stats = fleet.sandbox.stats()
    for job, (to, entity, path) in zip(final, cases, strict=True):
        assert job.state.value == "done", (to, job.error)
        assert job.file_id
        stored = [f for f in stats["files"] if f["entity_id"] == entity]
        assert len(stored) == 1, (to, stored)
        assert stored[0]["md5"] == md5_hex(path), to
        assert stored[0]["size"] == path.stat().st_size
        assert stored[0]["id"] == job.file_id
        record = fleet.record(job.id)
        assert record["size_verified"] == "1"
        assert not (Path(fleet.env["STAGING_DIR"]) / job.id).exists(), "staging not cleaned"
        if record.get("upload_id"):
            assert stats["links"][record["upload_id"]] == 1
    assert stats.get("blob_authorization_headers", 0) == 0


@pytest.mark.parametrize("route", ["generate", "blob", "link"])
def test_transient_failure_then_success_continues_the_chain_once(
    fleet: Fleet, tmp_path: Path, route: str
) -> None:
    fleet.sandbox.set_faults({"routes": {route: {"503": 1.0}}})
    before = fleet.sandbox.stats()["faults_injected"].get("503", 0)
    entity = fleet.entity("tasks")
    f = random_file(tmp_path / "t.bin", 20_000)
    job = fleet.uploads.enqueue(f, to=f"task:{entity}")
    wait_until(lambda: fleet.sandbox.stats()["faults_injected"].get("503", 0) >= before + 2)
    fleet.sandbox.set_faults({"routes": {route: {"503": 0}}})
    (final,) = fleet.wait([job], timeout=60)
    assert final.state.value == "done", final.error
    stats = fleet.sandbox.stats()
    record = fleet.record(job.id)
    assert stats["links"][record["upload_id"]] == 1
    assert len(fleet.files_of(entity)) == 1
    step = {"generate": "generate", "blob": "put", "link": "link"}[route]
    if route != "blob":  # block/PUT retries happen inside one put_file attempt first
        assert int(record[f"attempts_{step}"]) >= 2
    assert (
        record.get("error_code") in (None, "", "ServerBusy", "server-error")
        or record["error_status"] == "503"
    )


def test_permanent_error_fails_at_once_with_awork_code_and_trace_id(fleet: Fleet, tmp_path: Path) -> None:
    f = random_file(tmp_path / "orphan.txt", 1000)
    job = fleet.uploads.enqueue(f, to=f"task:{uuid.uuid4()}")
    (final,) = fleet.wait([job], timeout=30)
    assert final.state.value == "failed"
    assert final.error is not None
    assert final.error.code == "not-found"
    assert final.error.status == 404
    assert final.error.trace_id
    assert final.error.step == "link"
    assert final.attempts["link"] == 1
    # kept for `awork-uploads dead retry`; purge removes it
    assert (Path(fleet.env["STAGING_DIR"]) / job.id).exists()
    assert "upload_url" not in fleet.record(job.id)


def test_expired_upload_url_gets_a_fresh_one(fleet: Fleet, tmp_path: Path) -> None:
    # URLs live 1 s and every PUT fails (503) until we stop it: retrying, the put step finds its
    # URL expired (by its se= or by the host's 403) and goes back to step 1 for a fresh one.
    fleet.sandbox.set_faults({"upload_url_lifetime_s": 1, "routes": {"blob": {"503": 1.0}}})
    entity = fleet.entity("documents")
    f = random_file(tmp_path / "late.bin", 30_000)
    job = fleet.uploads.enqueue(f, to=f"document:{entity}")
    wait_until(lambda: int(fleet.record(job.id).get("url_renewals") or 0) >= 1, timeout=40)
    fleet.sandbox.set_faults({"upload_url_lifetime_s": 900, "routes": {"blob": {"503": 0}}})
    (final,) = fleet.wait([job], timeout=60)
    assert final.state.value == "done", final.error
    record = fleet.record(job.id)
    assert int(record["attempts_generate"]) >= 2
    stats = fleet.sandbox.stats()
    assert stats["links"][record["upload_id"]] == 1
    files = fleet.files_of(entity)
    assert len(files) == 1 and files[0]["md5"] == md5_hex(f) and files[0]["upload_id"] == record["upload_id"]


def test_idempotency_key_uploads_once(fleet: Fleet, tmp_path: Path) -> None:
    entity = fleet.entity("projects")
    f = random_file(tmp_path / "once.bin", 10_000)
    first = fleet.uploads.enqueue(f, to=f"project:{entity}", idempotency_key="once-" + entity)
    second = fleet.uploads.enqueue(f, to=f"project:{entity}", idempotency_key="once-" + entity)
    assert first.id == second.id
    fleet.wait([first], timeout=30)
    third = fleet.uploads.enqueue(f, to=f"project:{entity}", idempotency_key="once-" + entity)
    assert third.id == first.id and third.state.value == "done"
    assert len(fleet.files_of(entity)) == 1


def test_cli_enqueue_wait_json(fleet: Fleet, tmp_path: Path) -> None:
    entity = fleet.entity("tasks")
    good = random_file(tmp_path / "good.bin", 4000)
    bad = random_file(tmp_path / "bad.bin", 4000)
    env = {**os.environ, **{k: fleet.env[k] for k in ("REDIS_URL", "STAGING_DIR", "AWORK_WORKSPACES_FILE")}}
    cmd = [sys.executable, "-m", "producers.cli", "enqueue", "--wait", "--json", "--timeout", "60"]
    ok = subprocess.run([*cmd, str(good), "--to", f"task:{entity}"], env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    line = json.loads(ok.stdout.strip().splitlines()[-1])
    assert line["state"] == "done" and line["file_id"] and line["error"] is None
    failed = subprocess.run(
        [*cmd, str(bad), "--to", f"task:{uuid.uuid4()}"], env=env, capture_output=True, text=True
    )
    assert failed.returncode == 1
    err = json.loads(failed.stdout.strip().splitlines()[-1])["error"]
    assert err["code"] == "not-found" and err["status"] == 404 and err["trace_id"]
    # one line per step outcome; Celery's own "received" / "succeeded in" lines are quieted
    logs = "".join(p.read_text(errors="replace") for p in fleet.logs.glob("worker-*.log"))
    assert "outcome=ok" in logs and "outcome=failed" in logs
    assert "] received" not in logs and "succeeded in" not in logs
