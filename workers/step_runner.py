"""What every step does around its own work: record checks, a lock, heartbeats, retries.

One place decides how a failure ends: a rate wait is deferred without using up retries, a
transient error retries with backoff and full jitter until the budget is spent (then `dead`),
a permanent error fails the job at once, keeping awork's code and trace id.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import Any, NoReturn

import redis
from celery import Task
from celery.exceptions import Ignore, Reject, Retry
from kombu.exceptions import OperationalError

from producers import staging
from producers.broker import MAX_COUNTDOWN_SECONDS
from producers.contract import API_STEPS, TASK_GENERATE_UPLOAD_URL, TASK_PUT_FILE, JobState
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
from workers.step_context import (
    MAX_INLINE_WAIT_SECONDS,
    RateWait,
    StepContext,
    inline_waiters,
    max_inline_waiters,
)
from workers.step_lock import CancelRequested, LeaseLost

log = logging.getLogger("awork.steps")

# A step found running elsewhere is looked at again after this long.
LOCKED_RECHECK_SECONDS = 20
# Redis unreachable (a restart, a network drop): the step's message goes back to the queue.
UNREACHABLE = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OperationalError)
# A step deferred because the workspace's waiting slots in this process are taken (see
# step_context.max_inline_waiters): full jitter under a ceiling that doubles per such deferral.
CONTENDED_BACKOFF_BASE_SECONDS = 0.5
CONTENDED_BACKOFF_MAX_SECONDS = 30.0


class JobEnded(Exception):
    """The job reached `failed` or `dead`: the chain stops here. Listed in the tasks' `throws`."""


def run_step(
    task: Task[Any, Any],
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
        # (celery's Reject keeps requeue and reason as plain attributes its type stubs omit)
        reason = getattr(exc, "reason", None)
        if not getattr(exc, "requeue", True) and isinstance(reason, UNREACHABLE):
            raise _requeue(step, job_id, reason) from None
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
    task: Task[Any, Any],
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
    if contended and inline_waiters(ctx.workspace) < max_inline_waiters():
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
    kwargs = dict(ctx.task.request.kwargs or {})
    app = ctx.task.app
    # by task name, as producers.redrive builds a chain: the runner does not import the steps
    sig = app.signature(TASK_GENERATE_UPLOAD_URL, kwargs=kwargs, immutable=True) | app.signature(
        TASK_PUT_FILE, kwargs=kwargs, immutable=True
    )
    replaced: BaseException = ctx.task.replace(sig)  # Celery's replace raises Ignore; typed loosely
    return replaced


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


def _end(ctx: StepContext, state: JobState, err: AworkError) -> NoReturn:
    """Finish the job as failed/dead and stop the chain.

    The staged bytes stay, so `awork-uploads dead retry` can re-drive the job; `dead purge`
    (or the sweeper, once the record has expired) removes them.
    """
    _record_error(ctx, err)
    ctx.rt.store.finish(ctx.job_id, state, notify=ctx.record.get("notify") == "1")
    announce_end(ctx.task, ctx.rt, ctx.job_id, ctx.record)
    metrics.job_finished(state.value, ctx.workspace)
    raise JobEnded(scrub(f"{state.value}: {err.code or ''} {err.message}".strip()))


def announce_end(task: Task[Any, Any], rt: Runtime, job_id: str, record: dict[str, str]) -> None:
    """After a job's end: its callbacks go to `awork.callbacks` (producers.endings). Best
    effort here: what fails stays in ENDED_KEY and the sweeper announces it."""
    if record.get("notify") != "1":
        return
    try:
        announce(rt.redis, task.app, [job_id])
    except Exception:
        log.warning("job=%s: could not announce its end now; the sweeper will", job_id, exc_info=True)


def end_canceled(
    task: Task[Any, Any], rt: Runtime, job_id: str, record: dict[str, str], step: str
) -> NoReturn:
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
