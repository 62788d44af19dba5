"""The sweeper's rules, apart from its Redis work: when an unfinished job counts as lost, and
which job a queued or unacknowledged message belongs to.

Timings (seconds) come from the environment, read once when the worker starts (SweeperTimings,
in WorkerSettings): AWORK_SWEEPER_INTERVAL (15), AWORK_SWEEPER_STALL (45),
AWORK_SWEEPER_LOST_COUNTDOWN (120), AWORK_SWEEPER_UNPUBLISHED (60), AWORK_SWEEPER_IDLE (180),
AWORK_SWEEPER_COOLDOWN (300: a job is re-driven at most once in this long).
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

from producers.config import env_float
from producers.job_ids import is_job_id

MAYBE_LOST = "maybe-lost"
FINISHED = ("done", "failed", "dead", "canceled")


@dataclass(frozen=True)
class SweeperTimings:
    interval: float = 15.0
    stall: float = 45.0  # a heartbeat this old: the worker is gone
    lost_countdown: float = 120.0  # a countdown this overdue
    unpublished: float = 60.0
    cooldown: float = 300.0
    idle: float = 180.0  # no sign of life and no message anywhere

    @property
    def orphan_message(self) -> float:
        """A message held this long by a worker with nothing to show for it in the record is
        lost. Above the 20 s countdown a step takes when it finds its lock held elsewhere (which
        sets no `wait_until`), so a live worker's deferred copy is not taken for a lost one."""
        return max(self.stall, 30.0)

    @classmethod
    def from_env(cls) -> SweeperTimings:
        d = cls()
        return cls(
            interval=env_float("AWORK_SWEEPER_INTERVAL", d.interval),
            stall=env_float("AWORK_SWEEPER_STALL", d.stall),
            lost_countdown=env_float("AWORK_SWEEPER_LOST_COUNTDOWN", d.lost_countdown),
            unpublished=env_float("AWORK_SWEEPER_UNPUBLISHED", d.unpublished),
            cooldown=env_float("AWORK_SWEEPER_COOLDOWN", d.cooldown),
            idle=env_float("AWORK_SWEEPER_IDLE", d.idle),
        )


DEFAULT_TIMINGS = SweeperTimings()


def _f(record: dict[str, str], name: str) -> float:
    try:
        return float(record.get(name) or 0)
    except ValueError:
        return 0.0


def stalled_reason(
    record: dict[str, str],
    lock_held: bool,
    now: float,
    oldest_message: float | None = None,
    timings: SweeperTimings = DEFAULT_TIMINGS,
) -> str | None:
    """Why this unfinished job needs re-driving, or None.

    `oldest_message`: when the oldest message of this job that sits unacknowledged in a
    worker's hands was delivered (None: no such message).
    """
    t = timings
    if record.get("state") in FINISHED:
        return None
    if now - _f(record, "redriven_at") < t.cooldown:
        return None
    last_activity = max(_f(record, "heartbeat_at"), _f(record, "updated_at"))
    if record.get("published") == "0":
        if now - _f(record, "created_at") > t.unpublished:
            return "unpublished"
        return None
    if lock_held:
        return None
    if record.get("running"):
        if now - last_activity > t.stall:
            return f"lost-{record['running']}"
        return None
    wait_until = _f(record, "wait_until")
    if wait_until and now - wait_until <= t.lost_countdown:
        return None  # a countdown that may still be pending
    if wait_until and last_activity < wait_until:
        # The countdown is long over and nothing ran since: the worker holding the deferred
        # message died (or, with no message held anywhere, it waits in a queue or is lost).
        return "lost-countdown" if oldest_message is not None else MAYBE_LOST
    if oldest_message is not None:
        if now - oldest_message > t.orphan_message and now - last_activity > t.orphan_message:
            return "lost-message"
        return None
    if now - last_activity > t.idle:
        return MAYBE_LOST  # lost, unless its message waits in a queue
    return None


def payload_job_id(raw: bytes | str | dict[str, Any]) -> str | None:
    """The job id of a kombu message as it sits in a queue (our steps take it as job_id)."""
    try:
        payload = json.loads(raw) if isinstance(raw, bytes | str) else raw
        body = payload["body"]
        if payload.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        decoded = json.loads(body)
        kwargs = decoded[1] if isinstance(decoded, list) else {}
        job_id = kwargs.get("job_id")
        return job_id if is_job_id(job_id) else None
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None


def message_job_id(raw: bytes | str) -> str | None:
    """The job id of a kombu `unacked` entry ([payload, exchange, routing key])."""
    try:
        return payload_job_id(json.loads(raw)[0])
    except (ValueError, KeyError, IndexError, TypeError):
        return None
