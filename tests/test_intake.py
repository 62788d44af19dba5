"""The HTTP intake over real HTTP on loopback (no workers): every route and every error."""

from __future__ import annotations

import base64
import hashlib
import os
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from producers.config import SharedSettings
from producers.keys import job_key, step_lock_key
from tests.intake_util import Intake, make_token, running_intake

HOST = "files.example.com"
CAP = 64 * 1024


@pytest.fixture
def env(producer_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setenv("AWORK_SOURCE_URL_HOSTS", HOST)
    monkeypatch.setenv("AWORK_CALLBACK_HOSTS", "hooks.example.com")
    return producer_env


@pytest.fixture
def intake(env: dict[str, str]) -> Iterator[Intake]:
    with running_intake(SharedSettings.from_env(), max_body_bytes=CAP) as running:
        yield running


@pytest.fixture
def token(env: dict[str, str]) -> str:
    return make_token(env["REDIS_URL"], ["default", "ghost"]).token


@pytest.fixture
def http(intake: Intake, token: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=intake.url, headers={"Authorization": f"Bearer {token}"}, timeout=10) as c:
        yield c


def _task() -> str:
    return f"task:{uuid.uuid4()}"


def _url_job(http: httpx.Client, path: str = "a", **fields: str) -> httpx.Response:
    """POST /v1/jobs (JSON) for a new task's job whose bytes are at https://HOST/<path>."""
    return http.post("/v1/jobs", json={"to": _task(), "source_url": f"https://{HOST}/{path}", **fields})


def _problem(resp: httpx.Response, status: int, field: str | None = None) -> dict[str, object]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    body = resp.json()
    assert body["status"] == status and body["type"].startswith("urn:awork-uploads:problem:")
    if field is not None:
        assert body["field"] == field, body
        assert str(body["detail"]).startswith(field), body
    return body


def test_url_job_is_enqueued_with_location(http: httpx.Client, intake: Intake) -> None:
    to = _task()
    resp = http.post("/v1/jobs", json={"to": to, "source_url": f"https://{HOST}/a/report.pdf?sig=x"})
    assert resp.status_code == 202, resp.text
    job = resp.json()
    assert job["state"] == "queued" and job["file_name"] == "report.pdf" and job["target"] == to
    assert resp.headers["location"] == f"/v1/jobs/{job['id']}"
    got = http.get(resp.headers["location"])
    assert got.status_code == 200 and got.json()["id"] == job["id"]
    client = redis.Redis.from_url(intake.uploads.settings.redis_url, decode_responses=True)
    queued = sum(client.llen(k) for k in client.scan_iter("awork.api*"))  # every priority list
    assert client.hget(job_key(job["id"]), "published") == "1" and queued == 1
    client.close()


def test_streamed_body_is_staged_with_its_md5_and_private_mode(
    http: httpx.Client, intake: Intake, env: dict[str, str]
) -> None:
    data = os.urandom(CAP - 10)

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(data), 7000):
            yield data[i : i + 7000]

    resp = http.post(
        "/v1/jobs",
        params={"to": _task(), "name": "blob.bin"},
        headers={"Content-Type": "application/octet-stream", "X-Awork-Description": "from a stream"},
        content=chunks(),
    )
    assert resp.status_code == 202, resp.text
    job = resp.json()
    record = intake.uploads.store.get(job["id"]) or {}
    assert record["source_md5"] == base64.b64encode(hashlib.md5(data).digest()).decode()
    assert record["description"] == "from a stream" and record["staged_owned"] == "1"
    staged = Path(record["source"])
    assert staged.read_bytes() == data and staged.parent == Path(env["STAGING_DIR"]) / job["id"]
    assert (
        stat.S_IMODE(staged.stat().st_mode) == 0o600 and stat.S_IMODE(staged.parent.stat().st_mode) == 0o700
    )


def test_multipart_upload_and_a_missing_file(http: httpx.Client, intake: Intake) -> None:
    resp = http.post(
        "/v1/jobs", data={"to": _task()}, files={"file": ("notes.txt", b"hello world", "text/plain")}
    )
    assert resp.status_code == 202, resp.text
    record = intake.uploads.store.get(resp.json()["id"]) or {}
    assert record["file_name"] == "notes.txt" and Path(record["source"]).read_bytes() == b"hello world"
    resp = http.post("/v1/jobs", data={"to": _task()}, files={"other": ("x.txt", b"x")})
    _problem(resp, 422, "file")


def test_body_over_the_cap_leaves_nothing_behind(http: httpx.Client, env: dict[str, str]) -> None:
    resp = http.post(
        "/v1/jobs",
        params={"to": _task(), "name": "big.bin"},
        headers={"Content-Type": "application/octet-stream"},
        content=b"x" * (CAP + 1),
    )
    _problem(resp, 413, "body")
    assert list(Path(env["STAGING_DIR"]).iterdir()) == []
    client = redis.Redis.from_url(env["REDIS_URL"])
    assert client.keys("awork:job:*") == []
    client.close()


def test_input_errors_name_the_field(http: httpx.Client, env: dict[str, str]) -> None:
    resp = http.post("/v1/jobs", content=b"{not json", headers={"Content-Type": "application/json"})
    _problem(resp, 400, "body")
    resp = _url_job(http, "a.pdf", to=f"planet:{uuid.uuid4()}")
    body = _problem(resp, 422, "to")
    assert "unknown target kind 'planet'" in str(body["detail"])
    resp = http.post("/v1/jobs", json={"to": _task(), "source_url": "https://elsewhere.test/a.pdf"})
    _problem(resp, 422, "source")
    resp = _url_job(http, colour="red")
    _problem(resp, 400, "colour")
    resp = _url_job(http, workspace="ghost")
    body = _problem(resp, 422, "workspace")
    assert "unknown workspace 'ghost'" in str(body["detail"])
    resp = _url_job(http, callback_url="https://evil.test/x?token=s3cret")
    body = _problem(resp, 422, "callback_url")
    assert "s3cret" not in resp.text and "evil.test:443" in str(body["detail"])
    resp = http.post("/v1/jobs", content=b"x", headers={"Content-Type": "text/plain"})
    _problem(resp, 415, "content-type")
    _problem(http.get("/v1/jobs/../etc"), 404)
    _problem(http.get("/v1/jobs/NOT-A-JOB-ID"), 400, "id")
    _problem(http.get(f"/v1/jobs/{uuid.uuid4().hex}"), 404, "id")
    _problem(http.get("/v1/jobs", params={"limit": 0}), 400, "limit")
    _problem(http.get("/v1/jobs", params={"state": "sleeping"}), 400, "state")
    assert list(Path(env["STAGING_DIR"]).iterdir()) == []  # no request above staged anything


def test_tokens_and_workspaces(intake: Intake, env: dict[str, str]) -> None:
    body = {"to": _task(), "source_url": f"https://{HOST}/a.pdf"}
    resp = httpx.post(f"{intake.url}/v1/jobs", json=body)
    _problem(resp, 401, "authorization")
    assert resp.headers["www-authenticate"].startswith("Bearer")
    resp = httpx.post(
        f"{intake.url}/v1/jobs",
        json=body,
        headers={"Authorization": "Bearer awu_0000000000000000_" + "x" * 43},
    )
    _problem(resp, 401, "authorization")
    other = make_token(env["REDIS_URL"], ["second"], name="other").token
    resp = httpx.post(f"{intake.url}/v1/jobs", json=body, headers={"Authorization": f"Bearer {other}"})
    _problem(resp, 403, "workspace")
    # a streamed body for a workspace outside the token is refused before it is read
    resp = httpx.post(
        f"{intake.url}/v1/jobs",
        params={"to": _task()},
        content=b"abc",
        headers={"Authorization": f"Bearer {other}", "Content-Type": "application/octet-stream"},
    )
    _problem(resp, 403, "workspace")
    mine = make_token(env["REDIS_URL"], ["default"], name="mine").token
    job = httpx.post(f"{intake.url}/v1/jobs", json=body, headers={"Authorization": f"Bearer {mine}"}).json()
    # another token's workspaces do not include it: not found, not forbidden (no existence leak)
    _problem(
        httpx.get(f"{intake.url}/v1/jobs/{job['id']}", headers={"Authorization": f"Bearer {other}"}), 404
    )
    from producers.api_tokens import ApiTokens

    client = redis.Redis.from_url(env["REDIS_URL"])
    assert mine.split("_")[2] not in str(client.hgetall(f"awork:api-token:{mine.split('_')[1]}"))
    ApiTokens(client).revoke("mine")
    client.close()
    resp = httpx.get(f"{intake.url}/v1/jobs/{job['id']}", headers={"Authorization": f"Bearer {mine}"})
    _problem(resp, 401)


def test_rate_limit_answers_429_with_retry_after(intake: Intake, env: dict[str, str]) -> None:
    slow = make_token(env["REDIS_URL"], ["default"], rate=3, name="slow").token
    with httpx.Client(base_url=intake.url, headers={"Authorization": f"Bearer {slow}"}) as c:
        statuses = [c.get("/v1/jobs", params={"limit": 1}) for _ in range(8)]
    limited = [r for r in statuses if r.status_code == 429]
    assert limited and statuses[0].status_code == 200
    assert limited[0].headers["retry-after"] == "1"
    _problem(limited[0], 429)


def test_idempotency_key_replay_returns_the_same_job(http: httpx.Client, env: dict[str, str]) -> None:
    body = {"to": _task(), "source_url": f"https://{HOST}/a.pdf"}
    first = http.post("/v1/jobs", json=body, headers={"Idempotency-Key": "order-42"})
    again = http.post("/v1/jobs", json=body, headers={"Idempotency-Key": "order-42"})
    assert first.status_code == 202 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"] and again.json()["created"] is False
    # a streamed replay: the second body is not kept
    params = {"to": _task(), "name": "b.bin"}
    headers = {"Content-Type": "application/octet-stream", "Idempotency-Key": "upload-7"}
    a = http.post("/v1/jobs", params=params, headers=headers, content=b"one")
    b = http.post("/v1/jobs", params=params, headers=headers, content=b"two")
    assert a.json()["id"] == b.json()["id"] and b.status_code == 200
    assert sorted(p.name for p in Path(env["STAGING_DIR"]).iterdir()) == [a.json()["id"]]
    _problem(
        http.post("/v1/jobs", json=body, headers={"Idempotency-Key": "has space"}), 422, "idempotency_key"
    )


def test_listing_filters_and_pages(http: httpx.Client) -> None:
    ids = [_url_job(http, f"{i}.pdf").json()["id"] for i in range(5)]
    seen: list[str] = []
    cursor = 0
    while True:
        page = http.get("/v1/jobs", params={"limit": 2, "cursor": cursor, "state": "queued"}).json()
        seen += [j["id"] for j in page["jobs"]]
        if page["next_cursor"] is None:
            break
        cursor = int(page["next_cursor"])
    assert seen == list(reversed(ids))  # newest first
    assert http.get("/v1/jobs", params={"state": "done"}).json()["jobs"] == []
    _problem(http.get("/v1/jobs", params={"workspace": "second"}), 403, "workspace")


def test_cancel_in_each_state(http: httpx.Client, intake: Intake, env: dict[str, str]) -> None:
    client = redis.Redis.from_url(env["REDIS_URL"], decode_responses=True)

    def new(streamed: bool = False) -> str:
        if streamed:
            return http.post(
                "/v1/jobs",
                params={"to": _task(), "name": "c.bin"},
                content=b"abc",
                headers={"Content-Type": "application/octet-stream"},
            ).json()["id"]
        return _url_job(http, "c.pdf").json()["id"]

    queued = new(streamed=True)
    resp = http.post(f"/v1/jobs/{queued}/cancel")
    assert resp.status_code == 200 and resp.json()["state"] == "canceled"
    assert not (Path(env["STAGING_DIR"]) / queued).exists()  # its staged copy is gone
    assert client.zscore("awork:jobs:active", queued) is None and client.ttl(job_key(queued)) > 0
    assert http.post(f"/v1/jobs/{queued}/cancel").status_code == 200  # twice is fine

    waiting = new()
    client.hset(job_key(waiting), mapping={"state": "waiting_for_connection", "wait_reason": "connection"})
    assert http.post(f"/v1/jobs/{waiting}/cancel").json()["state"] == "canceled"

    running = new()
    client.hset(job_key(running), mapping={"state": "uploading", "running": "put"})
    client.set(step_lock_key(running, "put"), "someone", ex=30)
    resp = http.post(f"/v1/jobs/{running}/cancel")
    assert resp.status_code == 202 and resp.json()["state"] == "uploading" and resp.json()["cancel_requested"]

    linked = new()
    client.hset(job_key(linked), mapping={"state": "linking", "link_sent_for": "u-1"})
    body = _problem(http.post(f"/v1/jobs/{linked}/cancel"), 409, "id")
    assert "linked" in str(body["detail"])

    ended = new()
    client.hset(job_key(ended), "state", "done")
    body = _problem(http.post(f"/v1/jobs/{ended}/cancel"), 409, "id")
    assert "already ended (done)" in str(body["detail"])
    _problem(http.post(f"/v1/jobs/{uuid.uuid4().hex}/cancel"), 404, "id")
    _problem(http.post("/v1/jobs/xyz/cancel"), 400, "id")
    client.close()


def test_batches_of_urls_and_staged_files(http: httpx.Client, env: dict[str, str]) -> None:
    staging = Path(env["STAGING_DIR"])
    (staging / "inbox").mkdir()
    (staging / "inbox" / "a.bin").write_bytes(b"staged bytes")
    jobs = [{"to": _task(), "source_url": f"https://{HOST}/{i}.pdf"} for i in range(4)]
    jobs.append({"to": _task(), "staged_path": "inbox/a.bin"})
    resp = http.post("/v1/batches", json={"jobs": jobs}, headers={"Idempotency-Key": "nightly-1"})
    assert resp.status_code == 202, resp.text
    batch = resp.json()
    assert batch["total"] == 5 and len(batch["job_ids"]) == 5 and batch["created"] is True
    assert resp.headers["location"] == f"/v1/batches/{batch['id']}"
    again = http.post("/v1/batches", json={"jobs": jobs}, headers={"Idempotency-Key": "nightly-1"})
    assert again.status_code == 200 and again.json()["id"] == batch["id"]
    page = http.get(f"/v1/batches/{batch['id']}", params={"limit": 3}).json()
    assert page["total"] == 5 and page["open"] == 5 and len(page["jobs"]) == 3 and page["next_cursor"] == "3"
    rest = http.get(f"/v1/batches/{batch['id']}", params={"cursor": 3}).json()
    assert [j["id"] for j in page["jobs"] + rest["jobs"]] == batch["job_ids"]
    listed = http.get("/v1/jobs", params={"batch": batch["id"]}).json()
    assert [j["id"] for j in listed["jobs"]] == batch["job_ids"]
    # errors name the job
    bad = [
        {"to": _task(), "source_url": f"https://{HOST}/ok.pdf"},
        {"to": "task:nope", "source_url": f"https://{HOST}/x"},
    ]
    _problem(http.post("/v1/batches", json={"jobs": bad}), 422, "jobs[1].to")
    (staging / "inbox" / "link").symlink_to("/etc/passwd")
    for path, why in (
        ("../x", "jobs[0].staged_path"),
        ("/etc/passwd", "jobs[0].staged_path"),
        ("inbox/link", "jobs[0].staged_path"),
    ):
        _problem(http.post("/v1/batches", json={"jobs": [{"to": _task(), "staged_path": path}]}), 422, why)
    _problem(http.post("/v1/batches", json={"jobs": []}), 400, "jobs")
    _problem(http.get(f"/v1/batches/{uuid.uuid4().hex}"), 404, "id")
    _problem(http.get("/v1/batches/zzz"), 400, "id")


def test_health_and_readiness(intake: Intake, env: dict[str, str]) -> None:
    assert httpx.get(f"{intake.url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{intake.url}/readyz").json() == {"status": "ready"}


def test_a_name_with_a_nul_is_refused_before_the_body_is_read(
    http: httpx.Client, env: dict[str, str]
) -> None:
    """Found by the schemathesis test: a NUL in `name` reached the staged file's open (a 500)."""
    resp = http.post(
        "/v1/jobs",
        params={"to": _task(), "name": "a\x00b.txt"},
        headers={"Content-Type": "application/octet-stream"},
        content=b"abc",
    )
    _problem(resp, 422, "name")
    assert list(Path(env["STAGING_DIR"]).iterdir()) == []


def test_priority_and_recurring_options_reach_the_record(http: httpx.Client, intake: Intake) -> None:
    """The HTTP API carries the same job options as the Python API and the CLI: priority
    (JSON, query parameter or header) and on_existing / new_version_of; bad values name the field."""
    client = redis.Redis.from_url(intake.uploads.settings.redis_url, decode_responses=True)
    resp = _url_job(http, "a/export.csv", priority="bulk", on_existing="version")
    assert resp.status_code == 202, resp.text
    job = resp.json()
    assert job["priority"] == "bulk"
    record = client.hgetall(job_key(job["id"]))
    assert record["priority"] == "bulk" and record["on_existing"] == "version"
    assert record["flow"] == "resolve"  # looks for a file of that name first

    resp = http.post(
        "/v1/jobs",
        params={"to": _task(), "name": "v.bin", "new_version_of": "9a1b2c3d-0000-4000-8000-000000000001"},
        headers={"Content-Type": "application/octet-stream", "X-Awork-Priority": "high"},
        content=b"version bytes",
    )
    assert resp.status_code == 202, resp.text
    record = client.hgetall(job_key(resp.json()["id"]))
    assert record["priority"] == "high" and record["flow"] == "version"

    bad = _url_job(http, "a/x", priority="urgent")
    _problem(bad, 400, "priority")  # the JSON body's schema says which values
    bad = http.post(
        "/v1/jobs",
        params={"to": _task(), "name": "x.bin", "priority": "urgent"},
        headers={"Content-Type": "application/octet-stream"},
        content=b"x",
    )
    _problem(bad, 422, "priority")
    client.close()
