"""The sweeper: finds jobs whose step was lost with its worker and re-drives them.

Redis only hands an unacknowledged message to another worker after the visibility timeout
(hours, since it must stay above the longest step). So every worker runs this loop, and one at a
time (a Redis lease) looks at the unfinished jobs:

- a step marked `running` whose lock has expired and whose heartbeat is older than STALL_SECONDS:
  its worker died mid-step -> publish the job again from the step its record says is next;
- a countdown (rate wait or error retry) whose `wait_until` passed long ago with no activity
  since: the worker holding the deferred message died -> publish again;
- a record still `published=0` after a minute: its producer died between record and message.

The late redelivery of the original message then finds the work done (every step checks the
record first), so re-driving never doubles an upload.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import redis
from celery import Celery

from producers import staging
from producers.broker import celery_config
from producers.records import ACTIVE_KEY, job_key
from producers.redrive import canvas_from, resume_step

log = logging.getLogger("awork.sweeper")

STALL_SECONDS = 45.0  # heartbeat every 15 s, lock TTL 90 s: a step this quiet has lost its worker
LOST_COUNTDOWN_SECONDS = 120.0  # a countdown this overdue lost its holder
UNPUBLISHED_SECONDS = 60.0
REDRIVE_COOLDOWN_SECONDS = 300.0
INTERVAL_SECONDS = 15.0
ORPHAN_AGE_SECONDS = 3600.0
ORPHAN_EVERY_PASSES = 40  # about every 10 minutes
LEASE_KEY = "awork:sweeper:lease"
BATCH = 500


@dataclass
class SweepResult:
    scanned: int = 0
    redriven: int = 0
    republished: int = 0


def _f(record: dict[str, str], name: str) -> float:
    try:
        return float(record.get(name) or 0)
    except ValueError:
        return 0.0


def stalled_reason(record: dict[str, str], lock_held: bool, now: float) -> str | None:
    """Why this unfinished job needs re-driving, or None."""
    if record.get("state") in ("done", "failed", "dead"):
        return None
    if now - _f(record, "redriven_at") < REDRIVE_COOLDOWN_SECONDS:
        return None
    last_activity = max(_f(record, "heartbeat_at"), _f(record, "updated_at"))
    if record.get("published") == "0":
        if now - _f(record, "created_at") > UNPUBLISHED_SECONDS:
            return "unpublished"
        return None
    if record.get("running"):
        if not lock_held and now - last_activity > STALL_SECONDS:
            return f"lost-{record['running']}"
        return None
    wait_until = _f(record, "wait_until")
    if wait_until and now - wait_until > LOST_COUNTDOWN_SECONDS and last_activity < wait_until:
        return "lost-countdown"
    return None


class Sweeper:
    def __init__(self, client: redis.Redis, redis_url: str, staging_dir: Path | None = None) -> None:
        self.redis = client
        self.staging_dir = staging_dir
        self.app = Celery("awork-sweeper", set_as_current=False)
        self.app.conf.update(celery_config(redis_url))
        self.token = f"{time.time()}-{id(self)}"
        self._stop = threading.Event()

    def sweep_once(self, now: float | None = None) -> SweepResult:
        now = time.time() if now is None else now
        result = SweepResult()
        start = 0
        while True:
            ids = [i.decode() for i in self.redis.zrange(ACTIVE_KEY, start, start + BATCH - 1)]  # type: ignore[union-attr]
            if not ids:
                break
            start += BATCH
            pipe = self.redis.pipeline(transaction=False)
            for job_id in ids:
                pipe.hgetall(job_key(job_id))
            records = pipe.execute()
            for job_id, raw in zip(ids, records, strict=True):
                result.scanned += 1
                if not raw:
                    self.redis.zrem(ACTIVE_KEY, job_id)  # record expired or purged
                    continue
                record = {k.decode(): v.decode() for k, v in raw.items()}
                running = record.get("running")
                lock_held = bool(running) and bool(self.redis.exists(f"{job_key(job_id)}:lock:{running}"))
                reason = stalled_reason(record, lock_held, now)
                if reason is None:
                    continue
                self._redrive(record, reason)
                if reason == "unpublished":
                    result.republished += 1
                else:
                    result.redriven += 1
        return result

    def _redrive(self, record: dict[str, str], reason: str) -> None:
        job_id = record["id"]
        first = resume_step(record)
        canvas_from(self.app, record, first).apply_async()
        self.redis.hset(
            job_key(job_id),
            mapping={"redriven_at": repr(time.time()), "published": "1", "redrive_reason": reason},
        )
        self.redis.hincrby(job_key(job_id), "redrives", 1)
        log.warning("sweeper: job=%s re-driven from %s (%s)", job_id, first, reason)

    # -- the loop ----------------------------------------------------------------------------
    def _lease(self) -> bool:
        """One sweeper at a time across the fleet; the lease lapses if its holder dies."""
        ttl = int(INTERVAL_SECONDS * 2)
        if self.redis.set(LEASE_KEY, self.token, nx=True, ex=ttl):
            return True
        if self.redis.get(LEASE_KEY) == self.token.encode():
            self.redis.expire(LEASE_KEY, ttl)
            return True
        return False

    def run(self) -> None:
        passes = 0
        while not self._stop.wait(INTERVAL_SECONDS):
            try:
                if self._lease():
                    passes += 1
                    res = self.sweep_once()
                    if res.redriven or res.republished:
                        log.info("sweeper: %s", res)
                    if self.staging_dir is not None and passes % ORPHAN_EVERY_PASSES == 0:
                        remove_orphan_staging(self.redis, self.staging_dir)
            except Exception:
                log.warning("sweeper pass failed", exc_info=True)

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, name="awork-sweeper", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()


def remove_orphan_staging(client: redis.Redis, root: Path, min_age: float = ORPHAN_AGE_SECONDS) -> int:
    """Remove job folders in staging whose record is gone (expired or purged).

    Only folders older than `min_age`: a producer stages the bytes just before it writes the
    record, and that moment must not look like an orphan.
    """
    removed = 0
    if not root.is_dir():
        return 0
    cutoff = time.time() - min_age
    for child in root.iterdir():
        if not (child.is_dir() and len(child.name) == 32) or child.stat().st_mtime > cutoff:
            continue
        if not client.exists(job_key(child.name)):
            staging.remove_job_dir(root, child.name)
            removed += 1
    return removed
