"""What a step body gets (StepContext): its job record, the shared resources, and the calls it
makes around its awork requests (rate tokens, the fence, byte progress).

Kept apart from the runner (workers/step_runner.py) so that the modules the runner calls
(fair_gate, parking) can name it without importing the runner.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from celery import Task
from celery.signals import worker_init

from producers.contract import JobState
from producers.records import encode_update
from workers import metrics
from workers.runtime import Runtime
from workers.step_lock import lock_key

log = logging.getLogger("awork.steps")

# Waits this short are slept in place; longer ones are deferred with a countdown.
MAX_INLINE_WAIT_SECONDS = 1.0
# Steps whose first action is an awork API request: they take their token before they start.
# At most half the threads of a worker process sleep for one workspace's tokens at a time; that
# workspace's other steps are deferred, so that a backlog in one workspace cannot hold every
# thread while others have budget. Their countdown grows with the job's deferrals of this kind
# (full jitter, capped), so that a deep backlog does not cycle through the broker in a hot loop.
INLINE_WAITERS_SHARE = 0.5
_pool_size = 8  # the worker's --concurrency, set by _remember_pool_size when it starts
_inline_waiters: Counter[str] = Counter()  # workspace -> threads of this process sleeping for it
_inline_waiters_lock = threading.Lock()
# Byte progress (a record write and a Flower event) only for files at least this large.
PROGRESS_MIN_BYTES = 1 << 20


@worker_init.connect(weak=False, dispatch_uid="awork-step-runner-pool-size")
def _remember_pool_size(sender: Any = None, **_: Any) -> None:
    global _pool_size
    size = getattr(sender, "concurrency", None)
    if isinstance(size, int) and size > 0:
        _pool_size = size


def max_inline_waiters() -> int:
    """How many threads of this process may sleep for one workspace's tokens at once."""
    return max(1, int(_pool_size * INLINE_WAITERS_SHARE))


def inline_waiters(workspace: str) -> int:
    """Threads of this process sleeping for `workspace`'s tokens now."""
    with _inline_waiters_lock:
        return _inline_waiters[workspace]


@dataclass(eq=False)
class RateWait(Exception):
    """No rate token now: defer the step by `seconds` (does not count as an error)."""

    seconds: float
    # Short wait, but enough threads of this process already wait for this workspace.
    contended: bool = False


@dataclass
class StepContext:
    """What a step body gets: its job record and the shared resources."""

    task: Task[Any, Any]
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

    def finish_step(self, **fields: object) -> None:
        """The step's last record write, with its lock's release in the same round trip: the
        body has nothing left to do that the lock guards (what follows it, announcing the next
        step's transfer or Celery publishing the next step, is safe to do twice)."""
        if self.lock_token is None:
            self.update(**fields)
            return
        mapping = encode_update(**fields)
        self.rt.locks.release_with(self.job_id, self.step, self.lock_token, mapping)
        self.record.update(mapping)
        self.record.pop("running", None)

    def finish_job(self, state: JobState, drop: Sequence[str] = (), **fields: object) -> None:
        """End the job (JobStore.finish) with the step's lock deleted and its `running` mark
        cleared in the same transaction: a redelivered copy finds the job ended, whoever holds
        the lock by then, and the runner has no release left to make."""
        held = self.lock_token is not None
        notify = self.record.get("notify") == "1"
        self.rt.store.finish(
            self.job_id,
            state,
            notify=notify,
            drop=[*drop, lock_key(self.job_id, self.step)] if held else drop,
            clear=("running",) if held else (),
            **fields,
        )
        if self.lock_token is not None:
            self.rt.locks.forget(self.lock_token)

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
        if total < PROGRESS_MIN_BYTES:
            return  # a small file: the step's own end write records its bytes, Flower its end
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
