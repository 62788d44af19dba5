"""How soon a redelivered step looks again at a step lock that its dead holder left behind.

RabbitMQ hands a dead worker's unacknowledged message to another worker as soon as the dead
worker's connection closes (producers/transport.py). That copy finds the step still locked: the
lock lapses LOCK_TTL_SECONDS after the dead holder's last heartbeat (workers/step_lock.py). A
fixed recheck (LOCKED_RECHECK_SECONDS) would leave the step idle for up to that long after the
lock has gone; a redelivered copy looks again just after the lock's remaining time instead. A
copy that was not redelivered (a duplicate while a live worker runs the step) keeps the fixed
recheck: a live holder renews its lock, and looking sooner would only cost deferrals.
"""

from __future__ import annotations

from typing import Any

import redis

from producers.keys import step_lock_key

# After the lock's remaining time: clock skew and the countdown's whole-second rounding.
MARGIN_SECONDS = 1.0


def redelivered(task: Any) -> bool:
    """True when the broker says this message was delivered before (and not acknowledged)."""
    info = getattr(task.request, "delivery_info", None) or {}
    return bool(info.get("redelivered"))


def lock_recheck_seconds(client: redis.Redis, job_id: str, step: str, again: bool, default: float) -> float:
    """The countdown before a step that found its lock held looks again."""
    if not again:
        return default
    left_ms = int(client.pttl(step_lock_key(job_id, step)))
    if left_ms < 0:  # gone already (-2), or no expiry (-1: never set so by the workers)
        return MARGIN_SECONDS if left_ms == -2 else default
    return min(default, left_ms / 1000 + MARGIN_SECONDS)
