"""Step locks: at most one copy of a step runs per job, kept alive by one heartbeat thread.

A lock expires its TTL after its holder stops beating (a dead worker), so a redelivery or the
sweeper can take over. One timer thread per process renews the locks the process holds (and
stamps `heartbeat_at` in their job records) once each is a heartbeat old: steps shorter than a
heartbeat, most of them, cost no renewal at all.

Both figures bound how fast a step lost with a SIGKILLed worker resumes elsewhere (the sweeper
waits for the lock to lapse): AWORK_LOCK_TTL_SECONDS (default 60) and AWORK_HEARTBEAT_SECONDS
(default 10; keep it well under the TTL), read once when the worker starts (LockTimings, in
WorkerSettings). Tests and the fault soak shorten them.

A holder that was frozen (SIGSTOP, a paused VM or container, a long stall) while its lock lapsed
must not act on a job another worker has taken over. Before every request with an effect (an
awork API call, a blob commit) a step calls `fence`: with the lock renewed less than half a TTL
ago that costs nothing; otherwise Redis is asked, and a lock that is no longer ours stops the
step before the request (it is looked at again later, and then finds the work done).
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import redis

from producers.config import env_float
from producers.keys import job_key, step_lock_key

log = logging.getLogger("awork.steps")


DEFAULT_LOCK_TTL_SECONDS = 60
DEFAULT_HEARTBEAT_SECONDS = 10.0
RELEASE_RETRY_SECONDS = 1.0
RELEASE_INLINE_SECONDS = 3.0  # a failed release is retried this long before the step goes on

_RELEASE = Path(__file__).with_name("step_lock.lua").read_text()
# 1: renewed, 0: not ours, 2: renewed, and the job's producer asked to cancel it
_REFRESH = """
if redis.call("GET", KEYS[1]) == ARGV[1] then
  redis.call("EXPIRE", KEYS[1], tonumber(ARGV[2]))
  redis.call("HSET", KEYS[2], "heartbeat_at", ARGV[3])
  if redis.call("HGET", KEYS[2], "cancel_requested") == "1" then
    return 2
  end
  return 1
end
return 0
"""


@dataclass(frozen=True)
class LockTimings:
    """How long a lock lives without its holder (ttl) and how often a held lock is renewed."""

    ttl: int = DEFAULT_LOCK_TTL_SECONDS
    heartbeat: float = DEFAULT_HEARTBEAT_SECONDS

    @classmethod
    def from_env(cls) -> LockTimings:
        """AWORK_LOCK_TTL_SECONDS and AWORK_HEARTBEAT_SECONDS (at most a third of the TTL)."""
        ttl = max(2, int(env_float("AWORK_LOCK_TTL_SECONDS", DEFAULT_LOCK_TTL_SECONDS)))
        return cls(ttl, min(env_float("AWORK_HEARTBEAT_SECONDS", DEFAULT_HEARTBEAT_SECONDS), ttl / 3))


def lock_key(job_id: str, step: str) -> str:
    return step_lock_key(job_id, step)


def _keys(job_id: str, step: str) -> list[str]:
    """KEYS of step_lock.lua: the lock and the job's record."""
    return [lock_key(job_id, step), job_key(job_id)]


class LeaseLost(Exception):
    """This step's lock lapsed and may be someone else's now: do nothing more in this run."""


class CancelRequested(Exception):
    """The job's producer canceled it (producers.cancel) while this step ran: stop here."""


@dataclass
class _Held:
    job_id: str
    step: str
    renewed: float  # monotonic time the lock was last known ours (-inf: known lost)
    canceled: bool = False  # the heartbeat saw the job's cancel_requested flag


class StepLocks:
    def __init__(self, client: redis.Redis, timings: LockTimings | None = None) -> None:
        self.redis = client
        self.timings = timings or LockTimings()
        self._release = client.register_script(_RELEASE)
        self._refresh = client.register_script(_REFRESH)
        self._held: dict[str, _Held] = {}  # by token
        # Releases that failed (Redis away): retried every RELEASE_RETRY_SECONDS, so the next run
        # of the step need not wait for the lock's TTL once Redis is back.
        self._unreleased: dict[str, tuple[str, str]] = {}  # token -> (job id, step)
        self._mutex = threading.Lock()
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()  # set only when a release has failed

    def acquire_and_read(self, job_id: str, step: str) -> tuple[str | None, dict[str, str] | None]:
        """Try the lock and read the job record in one round trip: (token or None, record)."""
        token = uuid.uuid4().hex
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(lock_key(job_id, step), token, nx=True, ex=self.timings.ttl)
        # Who holds it now: redis-py sends the pipeline again when the connection broke before
        # the answer, and then the SET that did take the lock reports it taken (by us).
        pipe.get(lock_key(job_id, step))
        pipe.hgetall(job_key(job_id))
        try:
            set_ok, holder, raw = pipe.execute()
            got = bool(set_ok) or _s(holder or b"") == token
        except redis.exceptions.RedisError:
            # The SET may have reached Redis before the connection broke (and survive in its AOF):
            # release it once Redis answers, as it is ours, or the step waits out the TTL.
            self._release_retrying(job_id, step, token)
            raise
        record = {_s(k): _s(v) for k, v in raw.items()} or None
        if not got:
            return None, record
        with self._mutex:
            self._held[token] = _Held(job_id, step, time.monotonic())
            self._ensure_thread()
        return token, record

    def release_with(self, job_id: str, step: str, token: str, fields: dict[str, str]) -> None:
        """A step's last record write and its lock's release in one round trip. A Redis error
        propagates (the write may not have happened); the runner's release then tries again."""
        pairs = [part for field in fields.items() for part in field]
        self._release(keys=_keys(job_id, step), args=[token, *pairs])
        self.forget(token)

    def forget(self, token: str) -> None:
        """The lock is gone already (released with the last write, or deleted with the job's
        end, producers.records.JobStore.finish): no heartbeat, and release() has nothing to do."""
        with self._mutex:
            self._held.pop(token, None)

    def release(self, job_id: str, step: str, token: str) -> None:
        """Release a lock this process holds; one released already (release_with, forget, or a
        shutdown that handed the step back) is left alone."""
        with self._mutex:
            if self._held.pop(token, None) is None:
                return
        self._release_retrying(job_id, step, token)

    def _release_retrying(self, job_id: str, step: str, token: str) -> None:
        # A restarting Redis answers again within moments: retry a little here, so that a message
        # handed back right after this (a requeue) is not put off by its own stale lock.
        deadline = time.monotonic() + RELEASE_INLINE_SECONDS
        while not self._try_release(job_id, step, token):
            if time.monotonic() >= deadline:
                log.warning("job=%s step=%s: lock release failed; retried until Redis answers", job_id, step)
                with self._mutex:
                    self._unreleased[token] = (job_id, step)
                    self._ensure_thread()
                self._wake.set()  # the timer may sleep a heartbeat: retry within a second
                return
            time.sleep(RELEASE_RETRY_SECONDS / 5)

    def _try_release(self, job_id: str, step: str, token: str) -> bool:
        try:
            self._release(keys=_keys(job_id, step), args=[token])
        except redis.exceptions.RedisError:
            return False
        return True

    def _retry_releases(self) -> None:
        with self._mutex:
            pending = list(self._unreleased.items())
        for token, (job_id, step) in pending:
            if not self._try_release(job_id, step, token):
                return  # still away: next round
            with self._mutex:
                self._unreleased.pop(token, None)
            log.info("job=%s step=%s: lock released after Redis came back", job_id, step)

    def held(self) -> list[tuple[str, str, str]]:
        """(job id, step, token) of every lock this process holds: what a shutdown hands back."""
        with self._mutex:
            return [(h.job_id, h.step, token) for token, h in self._held.items()]

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._beat, name="awork-heartbeat", daemon=True)
            self._thread.start()

    def _beat(self) -> None:
        """The one timer of the process: it sleeps until the oldest lock is a heartbeat old (or
        a heartbeat at most, when none is held) and renews only the locks that are due; a lock
        younger than a heartbeat costs no Redis call and no wake-up. A lock taken while it
        sleeps is renewed at most two heartbeats after it was taken, well within its TTL
        (a heartbeat is at most a third of it)."""
        while True:
            self._wake.wait(self._until_due(time.monotonic()))
            self._wake.clear()
            if self._unreleased:
                self._retry_releases()
            self.beat_once(time.monotonic())

    def _until_due(self, now: float) -> float:
        """Seconds until a held lock is due for renewal (a pending release: within a second)."""
        beat = self.timings.heartbeat
        with self._mutex:
            oldest = min((h.renewed for h in self._held.values() if h.renewed > -math.inf), default=now)
            pending = bool(self._unreleased)
        # a floor, so that a renewal that failed (Redis away) is retried, not spun on
        wait = max(min(beat, oldest + beat - now), min(beat, RELEASE_RETRY_SECONDS) / 4)
        return min(wait, RELEASE_RETRY_SECONDS) if pending else wait

    def beat_once(self, now: float) -> int:
        """Renew the locks last renewed a heartbeat or more ago; returns how many were."""
        with self._mutex:
            # a lock known lost is not renewed: its step meets LeaseLost at its next fence
            due = [
                (t, h)
                for t, h in self._held.items()
                if h.renewed > -math.inf and now - h.renewed >= self.timings.heartbeat
            ]
        for token, h in due:
            try:
                self._renew(h.job_id, h.step, token)
            except redis.exceptions.RedisError:
                log.debug("heartbeat failed", exc_info=True)
        return len(due)

    def _renew(self, job_id: str, step: str, token: str) -> bool:
        """Extend the lock if it is still ours; note when it last was."""
        started = time.monotonic()
        args: list[str | int] = [token, self.timings.ttl, repr(time.time())]
        answer = int(self._refresh(keys=_keys(job_id, step), args=args))
        ours = answer > 0
        with self._mutex:
            held = self._held.get(token)
            if held is not None:
                held.renewed = started if ours else float("-inf")
                held.canceled = held.canceled or answer == 2
        return ours

    def fence(self, job_id: str, step: str, token: str) -> None:
        """Raise LeaseLost unless the lock is surely still ours for the next request, and
        CancelRequested once a heartbeat has seen the job's cancel flag (so a canceled transfer
        stops within a heartbeat, at its next block, at no extra Redis cost)."""
        with self._mutex:
            held = self._held.get(token)
            renewed = held.renewed if held is not None else float("-inf")
            canceled = held is not None and held.canceled
        if canceled:
            raise CancelRequested(f"job {job_id} was canceled during its {step} step")
        if time.monotonic() - renewed < self.timings.ttl / 2:
            return
        if not self._renew(job_id, step, token):
            raise LeaseLost(f"the {step} lock of job {job_id} lapsed and is no longer ours")
        with self._mutex:
            if held is not None and held.canceled:
                raise CancelRequested(f"job {job_id} was canceled during its {step} step")


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
