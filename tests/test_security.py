"""Locked down: hostile inputs are refused, and no secret reaches Redis, logs or Flower."""

from __future__ import annotations

import os
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from kombu import Connection, Exchange, Producer

from ops.demo_files import png_file, random_file
from ops.flower import FlowerProcess
from ops.redis_server import free_port
from tests.fleet import API_KEY, SECOND_KEY, Fleet
from tests.redis_scan import redis_contents

pytestmark = pytest.mark.slow

SAS_SIGNATURE = re.compile(r"sig=|se=\d{4}-|uploadurl", re.IGNORECASE)


METRICS_PORT = free_port()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    f = Fleet(
        tmp_path_factory.mktemp("secure"),
        worker_count=1,
        extra_env={"WORKER_METRICS_PORT": str(METRICS_PORT)},
    ).start()
    yield f
    f.stop()


def _wait_state(fleet: Fleet, job_id: str, timeout: float = 30) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = fleet.record(job_id)
        if record.get("state") in ("done", "failed", "dead"):
            return record
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish: {fleet.record(job_id)}")


def _crafted_job(fleet: Fleet, source: str) -> str:
    """A record as a hostile client with Redis access could write it, then its canvas."""
    return fleet.plant_job(file_name="loot.txt", source=source)["id"]


def test_worker_reads_only_inside_staging(fleet: Fleet, tmp_path: Path) -> None:
    secret = tmp_path / "outside" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text("not for upload")
    staging = Path(fleet.env["STAGING_DIR"])
    link = staging / "innocent.txt"
    link.symlink_to(secret)
    dotdot = Path(str(staging) + "/../" * len(staging.parts) + str(secret).lstrip("/"))
    for source in (str(link), str(dotdot), str(secret)):
        record = _wait_state(fleet, _crafted_job(fleet, source))
        assert record["state"] == "failed", record
        assert record["error_code"] == "source-refused"
    assert all(f["md5"] != "" and f["file_name"] != "loot.txt" for f in fleet.sandbox.stats()["files"])


def test_pickled_message_is_refused(fleet: Fleet) -> None:
    job_id = uuid.uuid4().hex
    with Connection(fleet.env["REDIS_URL"]) as conn:
        producer = Producer(conn.channel())
        producer.publish(
            [[], {"job_id": job_id}, {}],
            exchange=Exchange("awork.api"),
            routing_key="awork.api",
            serializer="pickle",
            headers={
                "task": "awork.generate_upload_url",
                "id": str(uuid.uuid4()),
                "argsrepr": "",
                "kwargsrepr": "",
            },
        )
    deadline = time.monotonic() + 20
    logs = ""
    while time.monotonic() < deadline:
        logs = "".join(p.read_text(errors="replace") for p in (fleet.root / "logs").glob("*.log"))
        if "ContentDisallowed" in logs or "disallowed" in logs.lower():
            break
        time.sleep(0.2)
    assert "ContentDisallowed" in logs or "disallowed" in logs.lower()
    assert fleet.record(job_id) == {}


def test_upload_host_not_allowed(tmp_path_factory: pytest.TempPathFactory) -> None:
    strict = Fleet(
        tmp_path_factory.mktemp("strict"),
        worker_count=1,
        concurrency=2,
        extra_env={"AWORK_UPLOAD_HOSTS": "uploads.awork.example:443"},
    ).start()
    try:
        entity = strict.entity("tasks")
        f = random_file(strict.root / "a.bin", 1000)
        job = strict.uploads.enqueue(f, to=f"task:{entity}")
        (final,) = strict.wait([job], timeout=30)
        assert final.state.value == "failed"
        assert final.error is not None and final.error.step == "put"
        assert final.error.code == "upload-host-refused"
        assert "not in AWORK_UPLOAD_HOSTS" in (final.error.description or "")
        stats = strict.sandbox.stats()
        assert stats.get("blob_requests", 0) == 0 and not stats["files"]
    finally:
        strict.stop()


def test_no_secret_in_redis_logs_or_flower(fleet: Fleet, tmp_path: Path) -> None:
    flower = FlowerProcess(fleet.env, basic_auth="ops:" + uuid.uuid4().hex).start()
    try:
        # Flower's event receiver connects a moment after its web server: a first job shows when.
        warm = fleet.uploads.enqueue(
            random_file(tmp_path / "warm.bin", 100), to=f"task:{fleet.entity('tasks')}"
        )
        flower.wait_for_tasks(
            lambda ts: any(t.get("name") and warm.id in str(t.get("kwargs")) for t in ts.values()),
            timeout=30,
        )
        jobs = []
        for kind, plural in (("task", "tasks"), ("document", "documents"), ("company", "companies")):
            f = random_file(tmp_path / f"{kind}.bin", 30_000)
            jobs.append(fleet.uploads.enqueue(f, to=f"{kind}:{fleet.entity(plural)}"))
        jobs.append(
            fleet.uploads.enqueue(png_file(tmp_path / "i.png"), to=f"image:users/{fleet.entity('users')}")
        )
        jobs.append(fleet.uploads.enqueue(random_file(tmp_path / "x.bin", 500), to=f"task:{uuid.uuid4()}"))
        final = fleet.wait(jobs, timeout=60)
        assert [j.state.value for j in final] == ["done"] * 4 + ["failed"]
        ours = {j.id for j in jobs}

        def ours_seen(ts: dict) -> dict:  # type: ignore[type-arg]
            return {k: t for k, t in ts.items() if any(j in str(t.get("kwargs")) for j in ours)}

        # 4 three-step/multipart jobs done (3 + 3 + 1 + 3 steps) and one that failed at link: 13.
        flower.wait_for_tasks(lambda ts: len(ours_seen(ts)) >= 13, timeout=30)
        all_tasks = flower.tasks()
        tasks = ours_seen(all_tasks)
        assert flower.get("/api/tasks", authenticated=False).status_code == 401

        names = {t["name"] for t in tasks.values()}
        assert len(tasks) == 13
        assert names <= {
            "awork.generate_upload_url",
            "awork.put_file",
            "awork.link_file",
            "awork.multipart_upload",
        }
        for task in tasks.values():
            kwargs = task["kwargs"]
            for field in ("job_id", "workspace", "target", "file_name"):
                assert field in kwargs

        haystacks: list[tuple[str, str]] = [("flower", str(all_tasks))]
        for path in (fleet.root / "logs").glob("*.log"):
            haystacks.append((path.name, path.read_text(errors="replace")))
        client = redis.Redis.from_url(fleet.env["REDIS_URL"])
        haystacks += redis_contents(client)
        for where, text in haystacks:
            assert API_KEY not in text and SECOND_KEY not in text, f"API key in {where}"
            assert not SAS_SIGNATURE.search(text), f"upload URL in {where}: {SAS_SIGNATURE.search(text)}"
        assert fleet.sandbox.stats()["blob_authorization_headers"] == 0
        assert os.environ.get("AWORK_API_KEY") != API_KEY
    finally:
        flower.stop()


def test_worker_metrics_after_a_run(fleet: Fleet, tmp_path: Path) -> None:
    """Runs after the leak test in this module: the worker has done real jobs by now."""
    import requests

    fleet.uploads.enqueue(random_file(tmp_path / "m.bin", 2000), to=f"task:{fleet.entity('tasks')}")
    time.sleep(1.0)
    text = requests.get(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10).text
    for family in (
        "awork_uploads_jobs_finished_total",
        "awork_uploads_steps_total",
        "awork_uploads_step_duration_seconds_bucket",
        "awork_uploads_retries_total",
        "awork_uploads_rate_limited_total",
        "awork_uploads_rate_wait_seconds",
        "awork_uploads_bytes_uploaded_total",
        "awork_uploads_queue_depth",
        "awork_uploads_dead_letters",
    ):
        assert family in text, family
    done = [
        line
        for line in text.splitlines()
        if line.startswith("awork_uploads_jobs_finished_total{") and 'state="done"' in line
    ]
    assert done and float(done[0].rsplit(" ", 1)[1]) >= 4
    assert API_KEY not in text
