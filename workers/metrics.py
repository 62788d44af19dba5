"""Prometheus metrics of a worker: a tiny typed API for the step runner.

Every name starts with ``awork_uploads_``. What the step runner reports:

- ``step_finished(step, workspace, outcome, seconds)`` after every step run, whatever its outcome
  (``ok``, ``skipped``, ``deferred``, ``rate_limited``, ``retry``, ``url_expired``, ``failed``,
  ``dead``): ``awork_uploads_steps_total`` and ``awork_uploads_step_duration_seconds``.
- ``job_finished(state, workspace)`` when a job reaches ``done``, ``failed`` or ``dead``:
  ``awork_uploads_jobs_finished_total``.
- ``retry(step, reason)`` for every retry scheduled after a transient error (``retry_reason(exc)``
  maps an exception to a small fixed vocabulary): ``awork_uploads_retries_total``.
- ``rate_limited(workspace)`` for every 429 from awork: ``awork_uploads_rate_limited_total``.
- ``rate_wait(workspace, seconds)`` whenever a step is deferred for a rate token or a 429 pause:
  ``awork_uploads_rate_wait_seconds`` (a histogram: count = deferrals, sum = seconds).
- ``bytes_uploaded(workspace, n)`` as bytes reach the upload host: ``awork_uploads_bytes_uploaded_total``.

Of the worker itself, read at scrape time: ``awork_uploads_consumer_loop_tick_age_seconds``
(workers/liveness.py: seconds since the consumer loop last ticked; the watchdog ends the worker
above ``AWORK_LIVENESS_SECONDS``).

Read from Redis at scrape time: the broker's gauges (workers/queue_metrics.py) and the fair
share's (workers/fair_metrics.py). The HTTP endpoint that serves them all, and the Celery hooks
that start it: workers/metrics_server.py.
"""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge, Histogram

log = logging.getLogger("awork.metrics")


def _tick_age() -> float:
    from workers.liveness import tick_age

    return tick_age()


PREFIX = "awork_uploads_"
# Steps last from milliseconds (a link) to many minutes (a multi-GB PUT).
STEP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
WAIT_BUCKETS = (0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

# The retry reasons `retry_reason` produces: a closed set keeps the label's cardinality small.
RETRY_REASONS = (
    "http_429",
    "http_5xx",
    "http_4xx",
    "timeout",
    "connection",
    "url_expired",
    "other",
)

JOBS_FINISHED = Counter(
    f"{PREFIX}jobs_finished",
    "Jobs that reached a final state (done, failed, dead).",
    ["state", "workspace"],
)
STEPS = Counter(
    f"{PREFIX}steps",
    "Step runs by outcome (ok, skipped, deferred, rate_limited, retry, url_expired, failed, dead).",
    ["step", "workspace", "outcome"],
)
STEP_DURATION = Histogram(
    f"{PREFIX}step_duration_seconds",
    "Wall time of one step run, by step and outcome.",
    ["step", "outcome"],
    buckets=STEP_BUCKETS,
)
RETRIES = Counter(
    f"{PREFIX}retries",
    "Retries scheduled after a transient error, by step and reason.",
    ["step", "reason"],
)
RATE_LIMITED = Counter(
    f"{PREFIX}rate_limited",
    "HTTP 429 responses from awork, per workspace.",
    ["workspace"],
)
RATE_WAIT = Histogram(
    f"{PREFIX}rate_wait_seconds",
    "Deferrals for a rate token or a 429 pause, per workspace (count = deferrals, sum = seconds).",
    ["workspace"],
    buckets=WAIT_BUCKETS,
)
# Set at scrape time from workers.liveness (the watchdog ends the worker above its limit).
LOOP_TICK_AGE = Gauge(
    f"{PREFIX}consumer_loop_tick_age_seconds",
    "Seconds since this worker's consumer loop last ticked (liveness; small when healthy).",
)
LOOP_TICK_AGE.set_function(_tick_age)
BYTES_UPLOADED = Counter(
    f"{PREFIX}bytes_uploaded",
    "Bytes accepted by the upload host (or sent in a multipart upload), per workspace.",
    ["workspace"],
)

# Metric family names (as exposed, without the _total/_bucket suffixes), for tests and dashboards.
FAMILIES = (
    f"{PREFIX}jobs_finished",
    f"{PREFIX}steps",
    f"{PREFIX}step_duration_seconds",
    f"{PREFIX}retries",
    f"{PREFIX}rate_limited",
    f"{PREFIX}rate_wait_seconds",
    f"{PREFIX}bytes_uploaded",
    f"{PREFIX}queue_depth",
    f"{PREFIX}unacked_messages",
    f"{PREFIX}dead_letters",
    f"{PREFIX}broker_up",
    f"{PREFIX}consumer_loop_tick_age_seconds",
)


# -- the API the step runner calls ----------------------------------------------------------------
def step_finished(step: str, workspace: str, outcome: str, seconds: float) -> None:
    """One step run ended with `outcome` after `seconds` of wall time."""
    STEPS.labels(step=step, workspace=workspace, outcome=outcome).inc()
    STEP_DURATION.labels(step=step, outcome=outcome).observe(max(0.0, seconds))


def job_finished(state: str, workspace: str) -> None:
    """A job reached its final state (`done`, `failed` or `dead`; a JobState works too)."""
    JOBS_FINISHED.labels(state=str(state), workspace=workspace).inc()


def retry(step: str, reason: str) -> None:
    """A retry was scheduled after a transient error; `reason` from `retry_reason(exc)`."""
    RETRIES.labels(step=step, reason=reason).inc()


def rate_limited(workspace: str) -> None:
    """awork answered 429 for this workspace."""
    RATE_LIMITED.labels(workspace=workspace).inc()


def rate_wait(workspace: str, seconds: float) -> None:
    """A step of this workspace was deferred `seconds` for a rate token or a 429 pause."""
    RATE_WAIT.labels(workspace=workspace).observe(max(0.0, seconds))


def bytes_uploaded(workspace: str, n: int) -> None:
    """`n` more bytes reached the upload host for this workspace (call with increments)."""
    if n > 0:
        BYTES_UPLOADED.labels(workspace=workspace).inc(n)


def retry_reason(exc: BaseException) -> str:
    """Map an error to one of RETRY_REASONS."""
    from workers.errors import AworkError, RateLimited, UploadUrlExpired

    if isinstance(exc, RateLimited):
        return "http_429"
    if isinstance(exc, UploadUrlExpired):
        return "url_expired"
    status = exc.status if isinstance(exc, AworkError) else None
    if status == 429:
        return "http_429"
    if status is not None and 500 <= status < 600:
        return "http_5xx"
    if status is not None and 400 <= status < 500:
        return "http_4xx"
    text = f"{type(exc).__name__} {exc}".lower()
    if "timeout" in text or "timed out" in text:
        return "timeout"
    if isinstance(exc, OSError) or "connection" in text:
        return "connection"
    return "other"


__all__ = [
    "FAMILIES",
    "PREFIX",
    "RETRY_REASONS",
    "bytes_uploaded",
    "job_finished",
    "rate_limited",
    "rate_wait",
    "retry",
    "retry_reason",
    "step_finished",
]
