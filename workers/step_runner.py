"""What every step does around its own work: record checks, a lock, heartbeats, retries.

One place decides how a failure ends: a rate wait is deferred without using up retries, a
transient error retries with backoff and full jitter until the budget is spent (then `dead`),
a permanent error fails the job at once, keeping awork's code and trace id.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

import redis
from celery import Task
from celery.exceptions import Ignore, Reject, Retry
from celery.signals import worker_init
from kombu.exceptions import OperationalError

from producers import staging
from producers.broker import MAX_COUNTDOWN_SECONDS
from producers.contract import API_STEPS, JobState
from producers.endings import announce
from producers.job_ids import is_job_id
from workers import fair_gate, metrics
from workers.connections.tokens import NeedsReconnect
from workers.error_text import scrub
from workers.errors import AworkError, PermanentError, RateLimited, TransientError, UploadUrlExpired
from workers.logging_setup import step_outcome
from workers.parking import connection_usable, park
from workers.ratelimit import suggested_countdown
from workers.record_checks import check_record
from workers.redelivery import lock_recheck_seconds, redelivered
from workers.runtime import Runtime, runtime
from workers.step_lock import CancelRequested, LeaseLost

log = logging.getLogger("awork.steps")

# A step found running elsewhere is looked at again after this long.
LOCKED_RECHECK_SECONDS = 20
# Redis unreachable (a restart, a network drop): the step's message goes back to the queue.
UNREACHABLE = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OperationalError)
# Waits this short are slept in place; longer ones are deferred with a countdown.
MAX_INLINE_WAIT_SECONDS = 1.0
# Steps whose first action is an awork API request: they take their token before they start.
# At most half the threads of a worker process sleep for one workspace's tokens at a time; that
# workspace's other steps are deferred, so that a backlog in one workspace cannot hold every
# thread while others have budget. Their countdown grows with the job's deferrals of this kind
# (full jitter, capped), so that a deep backlog does not cycle through the broker in a hot loop.
INLINE_WAITERS_SHARE = 0.5
_pool_size = 8  # the worker's --concurrency, set by _remember_pool_size when it starts
CONTENDED_BACKOFF_BASE_SECONDS = 0.5
CONTENDED_BACKOFF_MAX_SECONDS = 30.0
_inline_waiters: Counter[str] = Counter()  # workspace -> threads of this process sleeping for it
_inline_waiters_lock = threading.Lock()


@worker_init.connect(weak=False, dispatch_uid="awork-step-runner-pool-size")
def _remember_pool_size(sender: Any = None, **_: Any) -> None:
    global _pool_size
    size = getattr(sender, "concurrency", None)
    if isinstance(size, int) and size > 0:
        _pool_size = size


def max_inline_waiters() -> int:
    """How many threads of this process may sleep for one workspace's tokens at once."""
    return max(1, int(_pool_size * INLINE_WAITERS_SHARE))


class JobEnded(Exception):
    """The job reached `failed` or `dead`: the chain stops here. Listed in the tasks' `throws`."""


@dataclass(eq=False)
class RateWait(Exception):
    """No rate token now: defer the step by `seconds` (does not count as an error)."""

    seconds: float
    # Short wait, but enough threads of this process already wait for this workspace.
    contended: bool = False


@dataclass
class StepContext:
    """What a step body gets: its job record and the shared resources."""

    task: Task
    job_id: str
    step: str
    record: dict[str, str]
    rt: Runtime
    _last_progress: float = field(default=0.0)
    _last_sent: int = 0
    started: float = 0.0
    task_id: str | None = None
    hostname: str | None = None
    # A token taken before the step started (see _token_or_defer), used by the first take_token().
    token_held: bool = False
    lock_token: str | None = None  # this run's step lock (see fence)

    @property
    def workspace(self) -> str:
        return self.record["workspace"]

    def update(self, **fields: object) -> None:
        self.rt.store.update(self.job_id, **fields)
        self.record.update({k: "" if v is None else str(v) for k, v in fields.items()})

    def fence(self) -> None:
        """Raise LeaseLost if this run's step lock has lapsed: call it right before a request
        with an effect, so a worker that was frozen past its lock acts on nothing."""
        if self.lock_token is not None:
            self.rt.locks.fence(self.job_id, self.step, self.lock_token)

    def take_token(self) -> None:
        """Before one awork API request: a rate token (or RateWait when the wait is long), then
        the fence."""
        self._take_rate_token()
        self.fence()

    def _take_rate_token(self) -> None:
        if self.token_held:
            self.token_held = False
            return
        if not self.rt.limiter_enabled:
            return
        name = self.workspace
        limits = self.rt.limits(name)
        limiter = self.rt.limiter
        with _inline_waiters_lock:
            may_sleep = _inline_waiters[name] < max_inline_waiters()
            if may_sleep:
                _inline_waiters[name] += 1
        if not may_sleep:  # a token if one is free now, else defer: no thread of ours sleeps
            wait = limiter.acquire(name, limits)
            if wait > 0:
                raise RateWait(wait, contended=wait <= MAX_INLINE_WAIT_SECONDS)
            return
        try:
            wait = limiter.wait_for_token(name, limits, max_wait=MAX_INLINE_WAIT_SECONDS)
        finally:
            with _inline_waiters_lock:
                _inline_waiters[name] -= 1
        if wait > 0:
            raise RateWait(wait)

    def progress(self, sent: int, total: int) -> None:
        """Byte progress into the record and, as a custom PROGRESS state, into Flower."""
        now = time.monotonic()
        if now - self._last_progress < 0.5 and sent < total:
            return
        self._last_progress = now
        if sent > self._last_sent:
            metrics.bytes_uploaded(self.workspace, sent - self._last_sent)
            self._last_sent = sent
        self.rt.store.update(self.job_id, bytes_sent=sent, bytes_total=total)
        try:
            # Called from the uploader's block threads, where Celery's (thread-local) request is
            # empty: send with the task id and hostname captured in the task's own thread.
            # Flower shows a task's `result` (a repr, as Celery sends it on success) on its task
            # page and in /api/tasks: while PROGRESS, that is the byte count. The last event
            # goes out before the step returns, so the success event's result replaces it.
            figures = {"bytes_sent": sent, "bytes_total": total}
            app = self.task.app
            with app.events.default_dispatcher(hostname=self.hostname) as dispatcher:
                dispatcher.send(
                    "task-progress", uuid=self.task_id, job_id=self.job_id, result=repr(figures), **figures
                )
        except Exception:  # events are best effort; the record is the truth
            log.debug("could not send progress event", exc_info=True)


def run_step(
    task: Task,
    job_id: str,
    step: str,
    state: JobState,
    already_done: Callable[[dict[str, str]], bool],
    body: Callable[[StepContext], dict[str, Any]],
) -> dict[str, Any]:
    """Run one step for one job, safely when delivered twice or concurrently."""
    if not is_job_id(job_id):
        # a task argument from the queue: anyone who can publish can put anything here
        log.warning("step=%s job=%r outcome=dropped reason=malformed-job-id", step, str(job_id)[:80])
        raise Ignore()
    rt = runtime()
    try:
        token, record = rt.locks.acquire_and_read(job_id, step)
    except UNREACHABLE as exc:
        raise _requeue(step, job_id, exc) from None
    try:
        if record is None:
            log.warning("step=%s job=%s outcome=skipped reason=no-record", step, job_id)
            raise Ignore()
        if JobState(record.get("state", "queued")).finished:
            log.info("step=%s job=%s outcome=skipped reason=job-finished", step, job_id)
            raise Ignore()
        if token is not None and record.get("cancel_requested") == "1":
            end_canceled(task, rt, job_id, record, step)
        if already_done(record):
            log.info("step=%s job=%s outcome=skipped reason=already-done", step, job_id)
            return {"job_id": job_id, "step": step, "skipped": True}
        if token is None:
            log.info("step=%s job=%s outcome=deferred reason=running-elsewhere", step, job_id)
            again = redelivered(task)  # its worker died: look again once the lock has lapsed
            wait = lock_recheck_seconds(rt.redis, job_id, step, again, LOCKED_RECHECK_SECONDS)
            raise task.retry(countdown=wait, max_retries=None)
        return _run_locked(task, job_id, step, state, record, body, rt, token)
    except UNREACHABLE as exc:
        raise _requeue(step, job_id, exc) from None
    except Reject as exc:
        # Task.retry() turns a failed publish of the retry into Reject(requeue=False), which
        # would drop the only message the job has.
        if not exc.requeue and isinstance(exc.reason, UNREACHABLE):
            raise _requeue(step, job_id, exc.reason) from None
        raise
    finally:
        if token is not None:
            rt.locks.release(job_id, step, token)
            fair_gate.release(task.app, rt.store, rt.fair, token)


def _requeue(step: str, job_id: str, exc: BaseException) -> Reject:
    """Redis (records or broker) went away under the step, so it could neither finish nor
    schedule its retry: give the message back instead of letting Celery ack it as a failure,
    which would leave the job without a message. If Redis is still away the reject fails too
    and the message stays unacknowledged; the sweeper hands it back once Redis is up."""
    log.warning("step=%s job=%s outcome=requeued reason=redis-unreachable error=%s", step, job_id, exc)
    return Reject(f"redis unreachable: {exc}", requeue=True)


def _run_locked(
    task: Task,
    job_id: str,
    step: str,
    state: JobState,
    record: dict[str, str],
    body: Callable[[StepContext], dict[str, Any]],
    rt: Runtime,
    lock_token: str,
) -> dict[str, Any]:
    ctx = StepContext(
        task,
        job_id,
        step,
        record,
        rt,
        task_id=task.request.id,
        hostname=task.request.hostname,
        lock_token=lock_token,
    )
    if record.get("running") == step:
        # The last copy of this step never got to its `finally`: its worker died.
        crashes = rt.store.incr(job_id, f"crashes_{step}")
        if crashes > rt.settings.retry.max_crashes:
            _end(ctx, JobState.DEAD, AworkError(f"{step} lost its worker {crashes} times", code="poison"))
    if step in fair_gate.TRANSFER_STEPS:
        fair_gate.admit(ctx, lock_token)  # its slot in the fleet, or Ignore: it waits for one
    if step in API_STEPS:
        if not connection_usable(ctx):
            raise park(ctx)
        _token_or_defer(ctx)
    waited = [f for f in ("wait_reason", "wait_until") if record.pop(f, None) is not None]  # waits no more
    attempt = rt.store.start_step(job_id, step, state.value, clear=waited)
    record.update(state=state.value, running=step)
    ctx.started = time.monotonic()
    failure: Exception | None = None
    try:
        # Every step reads its record first: what anyone with Redis access wrote there is checked
        # here once, for every step, rather than by each step remembering to.
        check_record(job_id, record)
        result = body(ctx)
    except (JobEnded, Ignore, Retry):
        raise
    except Exception as exc:
        failure = exc
    if failure is not None:
        # Handled outside the `except`: a retry or JobEnded raised in there would carry the
        # error (whose text may hold a URL) as its __context__ into Celery's task-retried /
        # task-failed events, Flower and the logs.
        _handle_failure(ctx, attempt, failure)
    # `running` is cleared with the lock (run_step's finally) on every exit but a dead process:
    # what the sweeper and the next delivery look for.
    _log(ctx, attempt, "ok", None)
    return {"job_id": job_id, "step": step, **result}


def _handle_failure(ctx: StepContext, attempt: int, exc: Exception) -> NoReturn:
    """How a failed step body ends: deferred, retried, sent for a new URL, failed or dead."""
    task, rt, job_id = ctx.task, ctx.rt, ctx.job_id
    if isinstance(exc, RateWait):
        countdown = _defer_for_rate(ctx, exc.seconds, exc.contended)
        _log(ctx, attempt, "deferred", None, wait=round(countdown, 2))
        metrics.rate_wait(ctx.workspace, countdown)
        raise task.retry(countdown=countdown, max_retries=None)
    if isinstance(exc, UploadUrlExpired):
        raise _renew_url(ctx, attempt, exc)
    if isinstance(exc, NeedsReconnect):
        raise park(ctx)
    if isinstance(exc, CancelRequested):
        _log(ctx, attempt, "canceled", None)
        end_canceled(task, rt, job_id, ctx.record, ctx.step)
    if isinstance(exc, LeaseLost):
        # Frozen past the lock: another copy may own the step now. Look again later (that run
        # takes the lock afresh and finds the work done, or does it).
        _log(ctx, attempt, "deferred", None, wait=LOCKED_RECHECK_SECONDS, reason="lease-lost")
        raise task.retry(countdown=LOCKED_RECHECK_SECONDS, max_retries=None)
    if isinstance(exc, PermanentError):
        _log(ctx, attempt, "failed", exc)
        _end(ctx, JobState.FAILED, exc)
    if isinstance(exc, RateLimited):
        # The limiter has paused the workspace (observe() saw the 429); a longer pause is
        # caught by _token_or_defer when the job comes back.
        countdown = _defer_for_rate(ctx, exc.retry_after or 1.0, False, "rate_limit_429", "rate_limited")
        _log(ctx, attempt, "rate_limited", exc, wait=round(countdown, 2))
        metrics.rate_limited(ctx.workspace)
        metrics.rate_wait(ctx.workspace, countdown)
        raise task.retry(countdown=countdown, max_retries=None)
    if not isinstance(exc, TransientError | OSError):
        log.error(
            "step=%s job=%s unexpected error",
            ctx.step,
            job_id,
            exc_info=(type(exc), exc, exc.__traceback__),
        )
    raise _retry_or_die(ctx, attempt, exc)


def _token_or_defer(ctx: StepContext) -> None:
    """Before the step starts: take the token for its first API request, or defer it cheaply.

    While a workspace is paused after a 429 or has spent its minute budget, every job of it a
    worker pulls from a deep queue ends here: deferred with a countdown (jittered by
    `suggested_countdown`, so that the jobs of one pause do not all come back at once) before it
    counts an attempt, changes state or sleeps in a worker thread. A granted token is kept for
    the body's first take_token() (if the body ends without a request, it is simply not used); a
    short wait (pacing, the second window) is left to the body, which sleeps it in place, unless
    max_inline_waiters() threads of this process already do so for the workspace.
    """
    rt = ctx.rt
    if not rt.limiter_enabled:
        return
    try:
        decision = rt.limiter.try_acquire(ctx.workspace, rt.limits(ctx.workspace))
    except Exception:  # no key for it, Redis trouble: the body meets it too and retries it as an error
        log.debug("rate pre-check failed for job %s", ctx.job_id, exc_info=True)
        return
    if decision.granted:
        ctx.token_held = True
        return
    contended = decision.wait <= MAX_INLINE_WAIT_SECONDS
    if contended and _inline_waiters[ctx.workspace] < max_inline_waiters():
        return
    countdown = _defer_for_rate(ctx, decision.wait, contended)
    attempts = int(ctx.record.get(f"attempts_{ctx.step}") or 0)
    why = f"{decision.blocked_by}, contended" if contended else decision.blocked_by
    _log(ctx, attempts, "deferred", None, wait=round(countdown, 2), blocked_by=why)
    metrics.rate_wait(ctx.workspace, countdown)
    raise ctx.task.retry(countdown=countdown, max_retries=None)


def _defer_for_rate(
    ctx: StepContext,
    wait: float,
    contended: bool,
    reason: str = "rate_limit",
    counter: str = "rate_waits",
) -> float:
    """The countdown for a step that waits for a rate token (or, `rate_limit_429`, out a 429's
    pause), written into the job's record (`wait_reason`, `wait_until`; `counter` counts them).
    `contended` (a short wait, but the workspace's waiting slots in this process are taken) adds
    full jitter under a ceiling that doubles with the job's contended deferrals (`rate_contended`)."""
    fields: dict[str, object] = {}
    if contended:
        n = int(ctx.record.get("rate_contended") or 0)
        ceiling = min(CONTENDED_BACKOFF_MAX_SECONDS, CONTENDED_BACKOFF_BASE_SECONDS * 2 ** min(n, 16))
        wait += random.uniform(0.0, ceiling)
        fields["rate_contended"] = n + 1
    countdown = suggested_countdown(wait, MAX_COUNTDOWN_SECONDS)
    ctx.update(wait_reason=reason, wait_until=time.time() + countdown, **fields)
    ctx.rt.store.incr(ctx.job_id, counter)
    return countdown


def _retry_or_die(ctx: StepContext, attempt: int, exc: BaseException) -> BaseException:
    rt = ctx.rt
    errors = rt.store.incr(ctx.job_id, f"errors_{ctx.step}")
    err = exc if isinstance(exc, AworkError) else TransientError(scrub(f"{type(exc).__name__}: {exc}"))
    _record_error(ctx, err)
    policy = rt.settings.retry
    if errors >= policy.max_attempts:
        _log(ctx, attempt, "dead", err)
        _end(ctx, JobState.DEAD, err)
    ceiling = min(policy.max_seconds, policy.base_seconds * (2 ** (errors - 1)))
    retry_after = getattr(err, "retry_after", None) or 0.0
    countdown = min(MAX_COUNTDOWN_SECONDS, max(retry_after, random.uniform(ceiling / 2, ceiling)))
    ctx.update(wait_reason="retry", wait_until=time.time() + countdown)
    metrics.retry(ctx.step, metrics.retry_reason(err))
    _log(ctx, attempt, "retry", err, retry_in=round(countdown, 1))
    return ctx.task.retry(countdown=countdown, max_retries=None)


def _renew_url(ctx: StepContext, attempt: int, exc: UploadUrlExpired) -> BaseException:
    """Go back to step 1 for a fresh URL; the rest of the chain (link) is kept by `replace`."""
    renewals = ctx.rt.store.incr(ctx.job_id, "url_renewals")
    if renewals > 10:
        _end(ctx, JobState.DEAD, AworkError(f"upload URL refused {renewals} times: {exc.message}"))
    ctx.rt.store.clear(ctx.job_id, "upload_id", "upload_url", "upload_url_expires")
    _log(ctx, attempt, "url_expired", exc)
    from workers.steps import generate_upload_url, put_file

    kwargs = dict(ctx.task.request.kwargs or {})
    sig = generate_upload_url.si(**kwargs) | put_file.si(**kwargs)
    return ctx.task.replace(sig)


def _record_error(ctx: StepContext, err: AworkError) -> None:
    """The one place a record gets its error fields: every text passes `scrub` (no URL path or
    query, no credential), whatever raised it."""
    ctx.update(
        error_step=ctx.step,
        error_code=scrub(err.code or type(err).__name__),
        error_description=scrub(err.message),
        error_status=err.status,
        error_trace_id=err.trace_id,
    )


def _end(ctx: StepContext, state: JobState, err: AworkError) -> None:
    """Finish the job as failed/dead and stop the chain.

    The staged bytes stay, so `awork-uploads dead retry` can re-drive the job; `dead purge`
    (or the sweeper, once the record has expired) removes them.
    """
    _record_error(ctx, err)
    ctx.rt.store.finish(ctx.job_id, state, notify=ctx.record.get("notify") == "1")
    announce_end(ctx.task, ctx.rt, ctx.job_id, ctx.record)
    metrics.job_finished(state.value, ctx.workspace)
    raise JobEnded(scrub(f"{state.value}: {err.code or ''} {err.message}".strip()))


def announce_end(task: Task, rt: Runtime, job_id: str, record: dict[str, str]) -> None:
    """After a job's end: its callbacks go to `awork.callbacks` (producers.endings). Best
    effort here: what fails stays in ENDED_KEY and the sweeper announces it."""
    if record.get("notify") != "1":
        return
    try:
        announce(rt.redis, task.app, [job_id])
    except Exception:
        log.warning("job=%s: could not announce its end now; the sweeper will", job_id, exc_info=True)


def end_canceled(task: Task, rt: Runtime, job_id: str, record: dict[str, str], step: str) -> NoReturn:
    """The job's producer canceled it: end it `canceled`, remove its staged copy, announce it,
    and stop the chain without an awork request (Ignore: a cancel is no failure)."""
    rt.store.finish(job_id, JobState.CANCELED, notify=record.get("notify") == "1")
    if record.get("staged_owned") == "1":
        staging.remove_job_dir(rt.settings.shared.staging_dir, job_id)
    announce_end(task, rt, job_id, record)
    metrics.job_finished(JobState.CANCELED.value, record.get("workspace", ""))
    log.info("step=%s job=%s outcome=canceled", step, job_id)
    raise Ignore()


def cleanup_staging(ctx: StepContext) -> None:
    if ctx.record.get("staged_owned") == "1":
        staging.remove_job_dir(ctx.rt.settings.shared.staging_dir, ctx.job_id)


def _log(ctx: StepContext, attempt: int, outcome: str, err: AworkError | None, **more: Any) -> None:
    """The one line per step outcome, and its metric."""
    seconds = time.monotonic() - ctx.started if ctx.started else 0.0
    metrics.step_finished(ctx.step, ctx.workspace, outcome, seconds)
    step_outcome(
        log,
        job=ctx.job_id,
        workspace=ctx.workspace,
        step=ctx.step,
        attempt=attempt,
        outcome=outcome,
        status=getattr(err, "status", None),
        code=getattr(err, "code", None),
        trace_id=getattr(err, "trace_id", None),
        **more,
    )
