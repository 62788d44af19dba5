"""The step runner (workers.step_runner.run_step) without a fleet: a fake task, fakeredis.

Each test runs one delivery of a step and looks at what a user of the fleet would see: the job
record, the dead-letter set, the step lock, and what the task was asked to do (a countdown
retry, a replacement chain). Step bodies are small functions standing in for the real steps.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import fakeredis
import pytest
from celery import Celery
from celery.exceptions import Ignore, Retry

from producers.config import SharedSettings
from producers.contract import JobState
from producers.job_record import JobRecord
from producers.keys import ACTIVE_KEY, DEAD_KEY, job_key, step_lock_key
from producers.priority import DEFAULT_PRIORITY
from workers import runtime as runtime_module
from workers.errors import PermanentError, RateLimited, TransientError, UploadUrlExpired
from workers.fair_share import FairSettings, FairShare
from workers.limits_config import limits_for_workspace
from workers.runtime import Runtime
from workers.settings import RetryPolicy, Secret, WorkerSettings, Workspace
from workers.step_lock import DEFAULT_LOCK_TTL_SECONDS as LOCK_TTL_SECONDS
from workers.step_runner import LOCKED_RECHECK_SECONDS, JobEnded, RateWait, StepContext, run_step

JOB = "0123456789abcdef0123456789abcdef"
WORKSPACE = "acme"
MAX_ATTEMPTS = 3


@dataclass
class FakeTask:
    """What run_step uses of a Celery task: its request, retry() and replace()."""

    app: Celery
    kwargs: dict[str, Any] = field(default_factory=lambda: {"job_id": JOB})
    retries: list[dict[str, Any]] = field(default_factory=list)
    replaced: list[Any] = field(default_factory=list)

    @property
    def request(self) -> SimpleNamespace:
        return SimpleNamespace(id="task-1", hostname="worker@test", kwargs=self.kwargs)

    def retry(self, countdown: float | None = None, max_retries: int | None = 3, **_: Any) -> Retry:
        self.retries.append({"countdown": countdown, "max_retries": max_retries})
        return Retry(when=countdown)

    def replace(self, sig: Any) -> Ignore:
        self.replaced.append(sig)
        return Ignore()


@dataclass
class Fleet:
    """One worker process's view: its Runtime on fakeredis, and the task being delivered."""

    redis: fakeredis.FakeRedis
    rt: Runtime
    task: FakeTask

    def record(self) -> JobRecord:
        return JobRecord.decode(self.redis.hgetall(job_key(JOB)), JOB)

    def run(
        self,
        step: str,
        body: Callable[[StepContext], dict[str, Any]],
        already_done: Callable[[dict[str, str]], bool] = lambda record: False,
        state: JobState = JobState.LINKING,
    ) -> dict[str, Any]:
        return run_step(self.task, JOB, step, state, already_done, body)


def _noting(ran: list[bool]) -> Callable[[StepContext], dict[str, Any]]:
    """A step body that only notes that it ran."""

    def body(ctx: StepContext) -> dict[str, Any]:
        ran.append(True)
        return {}

    return body


@pytest.fixture()
def fleet(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Fleet]:
    # workers.steps (imported when a step renews its URL) builds its Celery app from REDIS_URL;
    # nothing connects to it here.
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:9/0")
    client = fakeredis.FakeRedis()
    api_url = "https://api.awork.example/api/v1"
    settings = WorkerSettings(
        shared=SharedSettings("redis://127.0.0.1:9/0", tmp_path / "staging", None, 3600, ()),
        api_url=api_url,
        workspaces={
            WORKSPACE: Workspace(WORKSPACE, Secret("key"), limits_for_workspace(WORKSPACE), api_url)
        },
        upload_hosts=(),
        retry=RetryPolicy(max_attempts=MAX_ATTEMPTS, base_seconds=4.0, max_seconds=8.0),
        connect_timeout=1.0,
        read_timeout=1.0,
    )
    rt = Runtime(settings)
    rt.__dict__["redis"] = client  # the cached properties (store, locks, limiter) build on it
    rt.__dict__["fair"] = FairShare(client, LOCK_TTL_SECONDS, FairSettings(enabled=False))
    rt.__dict__["limiter_enabled"] = True
    monkeypatch.setattr(runtime_module, "_runtime", rt)
    record = JobRecord(
        id=JOB,
        workspace=WORKSPACE,
        target="task:fedcba9876543210fedcba9876543210",
        file_name="report.pdf",
        size=2048,
        created_at=time.time(),
        updated_at=time.time(),
        upload_id="u-1",
        upload_url="https://blob.example/c/b?sig=s",
        upload_url_expires=time.time() + 3600,
    )
    client.hset(job_key(JOB), mapping=record.encode())
    client.zadd(ACTIVE_KEY, {JOB: record.created_at})
    yield Fleet(client, rt, FakeTask(Celery("step-runner-units", set_as_current=False)))


def test_a_step_that_succeeds_returns_its_result_and_releases_its_lock(fleet: Fleet) -> None:
    seen: list[str] = []

    def body(ctx: StepContext) -> dict[str, Any]:
        seen.append(ctx.record["running"])
        ctx.update(file_id="f-1")
        return {"file_id": "f-1"}

    assert fleet.run("link", body) == {"job_id": JOB, "step": "link", "file_id": "f-1"}
    rec = fleet.record()
    assert seen == ["link"] and rec.running is None  # running while the body ran, not after
    assert rec.attempts == {"link": 1} and rec.file_id == "f-1" and rec.state is JobState.LINKING
    assert not fleet.redis.exists(step_lock_key(JOB, "link"))
    assert fleet.task.retries == []


def test_a_paused_workspace_defers_the_step_without_using_up_a_retry(fleet: Fleet) -> None:
    limits = fleet.rt.limits(WORKSPACE)
    fleet.rt.limiter.observe(WORKSPACE, limits, 429, {"Retry-After": "30"}, elapsed=0.1)
    ran: list[bool] = []
    with pytest.raises(Retry):
        fleet.run("link", _noting(ran))
    assert ran == []  # deferred before the body, before it counts an attempt
    (retry,) = fleet.task.retries
    assert retry["max_retries"] is None and 29 <= retry["countdown"] <= 60
    rec = fleet.record()
    assert rec.wait_reason == "rate_limit" and rec.rate_waits == 1
    assert rec.wait_until is not None and rec.wait_until > time.time() + 29
    assert rec.attempts == {} and rec.errors == {} and rec.error_code is None
    assert not fleet.redis.exists(step_lock_key(JOB, "link"))


def test_waits_for_tokens_and_429s_in_the_body_do_not_count_as_errors(fleet: Fleet) -> None:
    def waits(ctx: StepContext) -> dict[str, Any]:
        raise RateWait(5.0)

    def throttled(ctx: StepContext) -> dict[str, Any]:
        raise RateLimited("slow down", status=429, retry_after=2.0)

    for n in range(MAX_ATTEMPTS + 1):  # more deferrals than the error budget: never dead
        with pytest.raises(Retry):
            fleet.run("link", waits if n % 2 else throttled)
    assert all(r["max_retries"] is None for r in fleet.task.retries)
    assert min(r["countdown"] for r in fleet.task.retries) >= 2.0
    rec = fleet.record()
    assert not rec.finished and rec.errors == {}
    assert rec.rate_waits == 2 and rec.rate_limited == 2
    assert rec.wait_reason in ("rate_limit", "rate_limit_429")


def test_a_transient_error_is_retried_with_backoff_and_recorded(fleet: Fleet) -> None:
    def flaky(ctx: StepContext) -> dict[str, Any]:
        raise TransientError("awork answered 503", status=503, code="server-error", trace_id="t-1")

    with pytest.raises(Retry):
        fleet.run("link", flaky)
    (retry,) = fleet.task.retries
    assert retry["max_retries"] is None and 2.0 <= retry["countdown"] <= 4.0  # base 4 s, full jitter
    rec = fleet.record()
    assert rec.errors == {"link": 1} and rec.attempts == {"link": 1}
    assert (rec.error_step, rec.error_code, rec.error_status, rec.error_trace_id) == (
        "link", "server-error", 503, "t-1"
    )
    assert rec.wait_reason == "retry" and not rec.finished
    assert fleet.run("link", lambda ctx: {"ok": True})["ok"] is True  # the next delivery goes on


def test_a_job_goes_dead_when_its_retries_are_spent(fleet: Fleet) -> None:
    def down(ctx: StepContext) -> dict[str, Any]:
        raise ConnectionResetError("connection reset by https://api.awork.example/x?token=abc")

    for _ in range(MAX_ATTEMPTS - 1):
        with pytest.raises(Retry):
            fleet.run("link", down)
    with pytest.raises(JobEnded, match=r"^dead"):
        fleet.run("link", down)
    rec = fleet.record()
    assert rec.state is JobState.DEAD and rec.finished_at is not None
    assert rec.errors == {"link": MAX_ATTEMPTS} and len(fleet.task.retries) == MAX_ATTEMPTS - 1
    assert rec.upload_url is None  # a write credential has no use after the end
    assert "token=abc" not in (rec.error_description or "")  # the text is scrubbed
    assert fleet.redis.zscore(DEAD_KEY, JOB) is not None  # a dead letter
    assert fleet.redis.zscore(ACTIVE_KEY, JOB) is None
    assert 0 < fleet.redis.ttl(job_key(JOB)) <= 3600
    ran: list[bool] = []
    with pytest.raises(Ignore):  # a later copy of the message does nothing
        fleet.run("link", _noting(ran))
    assert ran == []


def test_a_permanent_error_fails_the_job_at_once(fleet: Fleet) -> None:
    def refused(ctx: StepContext) -> dict[str, Any]:
        raise PermanentError("task not found", status=404, code="not-found")

    with pytest.raises(JobEnded, match=r"^failed"):
        fleet.run("link", refused)
    rec = fleet.record()
    assert rec.state is JobState.FAILED and rec.errors == {} and rec.error_code == "not-found"
    assert fleet.redis.zscore(DEAD_KEY, JOB) is not None and fleet.task.retries == []


def test_a_step_whose_lock_was_lost_stops_before_its_request(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Frozen past its lock's TTL while another worker took the step over: the fence stops
    the body before its request, nothing is written, and the other holder's lock stays."""
    sent: list[str] = []
    real_monotonic = time.monotonic

    def frozen_then_resumed(ctx: StepContext) -> dict[str, Any]:
        fleet.redis.set(step_lock_key(JOB, "link"), "another-worker", ex=LOCK_TTL_SECONDS)
        monkeypatch.setattr(time, "monotonic", lambda: real_monotonic() + LOCK_TTL_SECONDS + 1)
        ctx.take_token()  # before the request: a rate token, then the fence
        sent.append("POST link")
        ctx.update(file_id="f-1")
        return {}

    with pytest.raises(Retry):
        fleet.run("link", frozen_then_resumed)
    monkeypatch.setattr(time, "monotonic", real_monotonic)
    assert sent == []
    (retry,) = fleet.task.retries
    assert retry == {"countdown": LOCKED_RECHECK_SECONDS, "max_retries": None}
    rec = fleet.record()
    assert rec.file_id is None and rec.errors == {} and not rec.finished
    assert fleet.redis.get(step_lock_key(JOB, "link")) == b"another-worker"


def test_a_step_running_elsewhere_is_looked_at_again_later(fleet: Fleet) -> None:
    fleet.redis.set(step_lock_key(JOB, "link"), "another-worker", ex=LOCK_TTL_SECONDS)
    ran: list[bool] = []
    with pytest.raises(Retry):
        fleet.run("link", _noting(ran))
    assert ran == [] and fleet.task.retries == [{"countdown": LOCKED_RECHECK_SECONDS, "max_retries": None}]
    assert fleet.record().attempts == {}


def test_an_expired_upload_url_sends_the_job_back_for_a_new_one(fleet: Fleet) -> None:
    fleet.task.kwargs = {"job_id": JOB, "priority": 5}

    def put(ctx: StepContext) -> dict[str, Any]:
        raise UploadUrlExpired("the blob host refused the URL: expired", status=403)

    with pytest.raises(Ignore):  # what the fake task's replace() returns; Celery's raises too
        fleet.run("put", put, state=JobState.UPLOADING)
    (chain,) = fleet.task.replaced
    tasks = [(s.task, s.kwargs) for s in chain.tasks]
    assert tasks == [
        ("awork.generate_upload_url", {"job_id": JOB, "priority": 5}),
        ("awork.put_file", {"job_id": JOB, "priority": 5}),
    ]
    rec = fleet.record()
    assert rec.url_renewals == 1 and rec.errors == {} and not rec.finished
    assert (rec.upload_id, rec.upload_url, rec.upload_url_expires) == (None, None, None)
    assert fleet.task.retries == []


def test_a_transfer_waits_for_its_fair_share_without_an_error(fleet: Fleet) -> None:
    fair = FairShare(fleet.redis, LOCK_TTL_SECONDS, FairSettings(enabled=True))
    fleet.rt.__dict__["fair"] = fair
    fair.register("worker@test", 1)
    other = "1" * 32
    assert fair.admit(WORKSPACE, other, 1.0, 2048, DEFAULT_PRIORITY).granted  # takes the one slot
    ran: list[bool] = []
    with pytest.raises(Ignore):
        fleet.run("put", _noting(ran), state=JobState.UPLOADING)
    assert ran == [] and fleet.task.retries == []
    rec = fleet.record()
    assert rec.wait_reason == "fair_share" and rec.errors == {} and rec.attempts == {}
