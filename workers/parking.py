"""Jobs whose connection needs the customer again wait; they do not fail.

A connection in `needs_reconnect` (its OAuth grant was revoked or broke) parks every job that
reaches an API step: state `waiting_for_connection`, no awork request, no error retry used, the
step deferred with a countdown (AWORK_CONNECTION_RECHECK_SECONDS) rather than spinning in a
worker thread. `connections add NAME --oauth ...` or `oauth-complete` makes the connection
active again and the jobs go on at their next look.
"""

from __future__ import annotations

import logging
import time

from celery.exceptions import Retry
from prometheus_client import Counter

from producers.connections import ConnState
from producers.contract import JobState
from workers.metrics import PREFIX
from workers.step_context import StepContext

log = logging.getLogger("awork.steps")

CONNECTION_WAITS = Counter(
    f"{PREFIX}connection_waits",
    "Step deferrals because the job's connection needs the customer to connect again.",
    ["workspace"],
)
WAIT_REASON = "connection"


def connection_usable(ctx: StepContext) -> bool:
    """False when the job's (registered) connection is in `needs_reconnect`."""
    rt = ctx.rt
    if rt.is_static(ctx.workspace) or rt.connections is None:
        return True
    conn = rt.connections.get(ctx.workspace)
    return conn is None or conn.state is not ConnState.NEEDS_RECONNECT


def park(ctx: StepContext) -> Retry:
    """Defer the step until the connection is back; the record says why."""
    countdown = max(0.5, ctx.rt.connection_settings.recheck_seconds)
    ctx.update(
        state=JobState.WAITING_FOR_CONNECTION.value,
        wait_reason=WAIT_REASON,
        wait_until=time.time() + countdown,
    )
    ctx.rt.store.incr(ctx.job_id, "connection_waits")
    CONNECTION_WAITS.labels(ctx.workspace).inc()
    log.info(
        "step=%s job=%s workspace=%s outcome=waiting_for_connection wait=%s: connection needs_reconnect",
        ctx.step,
        ctx.job_id,
        ctx.workspace,
        countdown,
    )
    return ctx.task.retry(countdown=countdown, max_retries=None)
