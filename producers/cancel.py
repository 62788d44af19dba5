"""Canceling jobs: `Uploads.cancel`, `awork-uploads cancel`, `POST /v1/jobs/{id}/cancel`.

- A job no step is running for (queued, deferred, waiting for its connection) is `canceled` at
  once, in one Lua script that checks the step locks: its staged copy is removed and no awork
  request follows (every step reads the record under its lock first and skips a finished job).
- A job whose step runs gets `cancel_requested`: the step stops at its next block or fence check
  (the lock heartbeat notices the flag, workers/step_lock.py), or at the start of the next step,
  and ends the job `canceled`. Should the step finish the job first, it ends `done`.
- A job whose link (or one-request upload) was sent cannot be canceled: the file may be in awork
  already (`JobLinked`, HTTP 409). Ended jobs answer `JobEnded` (409); canceling twice is fine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import redis

from producers.keys import ACTIVE_KEY, DEAD_KEY, ENDED_KEY, EVENTS_CHANNEL, job_key, step_lock_key
from producers.records import STEPS
from producers.redis_text import as_str

_CANCEL = (Path(__file__).with_name("cancel.lua")).read_text()


class CancelRefused(Exception):
    """The job cannot be canceled; `reason` is `linked` or `ended`."""

    def __init__(self, job_id: str, reason: str, state: str) -> None:
        self.job_id, self.reason, self.state = job_id, reason, state
        if reason == "linked":
            text = f"job {job_id}: its file was handed to awork already (linked), it cannot be canceled"
        else:
            text = f"job {job_id}: already ended ({state}), nothing to cancel"
        super().__init__(text)


@dataclass(frozen=True)
class CancelOutcome:
    job_id: str
    outcome: str  # canceled | requested | missing | ended | linked
    previous_state: str


def cancel_script(client: redis.Redis, job_id: str, record_ttl_seconds: int) -> CancelOutcome:
    keys = [job_key(job_id), ACTIVE_KEY, DEAD_KEY, ENDED_KEY]
    keys += [step_lock_key(job_id, s) for s in STEPS]
    keys.append(EVENTS_CHANNEL)
    outcome, state = client.eval(_CANCEL, len(keys), *keys, job_id, repr(time.time()), record_ttl_seconds)
    return CancelOutcome(job_id, as_str(outcome), as_str(state))
