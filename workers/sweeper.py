"""The sweeper: finds jobs whose step was lost with its worker and re-drives them.

Redis only hands an unacknowledged message to another worker after the visibility timeout
(hours, since it must stay above the longest step). So every worker runs this loop, and one at a
time (a Redis lease) looks at the unfinished jobs:

- a step marked `running` whose lock has expired and whose heartbeat is older than `stall`:
  its worker died mid-step;
- a countdown (rate wait or error retry) whose `wait_until` passed `lost_countdown` ago
  with no activity since: the worker holding the deferred message died;
- a message delivered to a worker (in kombu's `unacked` hash) more than `orphan_message`
  ago, for a job with no step locked, no countdown pending and no activity since: its worker
  died after taking the message and before marking the step running (or while it held the
  message for a thread);
- a record still `published=0` after `unpublished`: its producer died between record and
  message;
- (a job waiting in its workspace's fair-share list for a transfer slot has no message on
  purpose: it is left alone while it is listed there; workers/fair_share.py)
- a job with no activity for `idle`, no step locked, no countdown pending, no message in
  a worker's hands and none in the queues (the queues are read only when such a job exists):
  its message was lost some other way (a worker that died between taking a message from the
  queue and registering it as unacknowledged, a failure acknowledged while Redis was away).

Re-driving moves the lost message itself back to the head of its queue (kombu's own restore, as
the visibility timeout would, only sooner), so it is not delivered a second time hours later.
When there is no such message (an unpublished record; an entry lost with a Redis restart) the
job is published again from the step its record says is next. Either way every step checks the
record first, so a copy that turns up later finds the work done and never doubles an upload.

With BROKER_URL on RabbitMQ (producers/transport.py) the duties that read kombu's `unacked` hash
are off (orphaned messages, unacknowledged messages of ended jobs): RabbitMQ redelivers a dead
consumer's messages as soon as its connection closes and confirms every publish. A quiet job
whose message may be lost is re-driven there only while the step queues are empty (RabbitMQ's
queues cannot be searched for it). What the broker holds is read by workers/broker_messages.py;
the other duties do not depend on the broker.

Each pass also fills free transfer slots from the fair-share waiting lists (a wake-up lost with
a worker, or slots a new worker brought).

It also keeps Redis from growing: ids of expired records leave the job index and the dead
letters (PRUNE_BATCH a pass), unacknowledged messages of jobs that have ended are dropped, and
staged bytes of jobs that are done, or whose record is gone, are removed (every
ORPHAN_EVERY_PASSES passes).

The rules and their timings (SweeperTimings) are in workers/sweeper_rules.py. With the step
lock's defaults (TTL 60 s, heartbeat 10 s) a step lost with a SIGKILLed worker resumes elsewhere
within about 75 s.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import redis
from celery import Celery

from producers.broker import celery_config
from producers.endings import announce_stale
from producers.job_ids import is_job_id
from producers.keys import (
    ACTIVE_KEY,
    DEAD_KEY,
    ENDED_KEY,
    INDEX_KEY,
    KOMBU_UNACKED_INDEX_KEY,
    SWEEPER_LEASE_KEY,
    job_key,
    step_lock_key,
)
from producers.records import STEPS, JobStore
from producers.redrive import canvas_from, resume_step
from workers import fair_gate
from workers.broker_messages import BrokerMessages
from workers.fair_share import FairSettings, FairShare, waiting_key
from workers.orphan_staging import remove_orphan_staging
from workers.step_lock import DEFAULT_LOCK_TTL_SECONDS
from workers.sweeper_rules import (
    DEFAULT_TIMINGS,
    MAYBE_LOST,
    SweeperTimings,
    stalled_reason,
)

log = logging.getLogger("awork.sweeper")


ORPHAN_EVERY_PASSES = 40  # about every 10 minutes at the default interval
BATCH = 500
PRUNE_BATCH = 500


@dataclass
class SweepResult:
    scanned: int = 0
    redriven: int = 0
    restored: int = 0  # of those, lost messages moved back to their queue
    republished: int = 0
    pruned: int = 0
    forgotten: int = 0  # unacknowledged messages of finished jobs dropped
    announced: int = 0  # callbacks of ended jobs that a dead process had not announced


class Sweeper:
    def __init__(
        self,
        client: redis.Redis,
        redis_url: str,
        staging_dir: Path | None = None,
        timings: SweeperTimings = DEFAULT_TIMINGS,
        lock_ttl: int = DEFAULT_LOCK_TTL_SECONDS,
    ) -> None:
        self.redis = client
        self.timings = timings
        self.staging_dir = staging_dir
        self.app = Celery("awork-sweeper", set_as_current=False)
        self.app.conf.update(celery_config(redis_url))
        self.token = f"{time.time()}-{id(self)}"
        self._stop = threading.Event()
        self._prune_offsets: dict[str, int] = {}
        self.fair = FairShare(client, lock_ttl, FairSettings.from_env())
        # What the broker holds: kombu's `unacked` hash and queue lists on Redis, the step
        # queues' depth on RabbitMQ (producers/transport.py).
        self.broker = BrokerMessages(client, self.app, redis_url)

    # -- one pass ----------------------------------------------------------------------------
    def sweep_once(self, now: float | None = None) -> SweepResult:
        now = time.time() if now is None else now
        result = SweepResult()
        held = self.broker.unacked()
        maybe_lost: list[dict[str, str]] = []
        seen: set[str] = set()
        start = 0
        while True:
            ids = self._zrange(ACTIVE_KEY, start, start + BATCH - 1)
            if not ids:
                break
            start += BATCH
            pipe = self.redis.pipeline(transaction=False)
            for job_id in ids:
                pipe.hgetall(job_key(job_id))
            records: list[dict[str, str]] = []
            for job_id, raw in zip(ids, pipe.execute(), strict=True):
                result.scanned += 1
                seen.add(job_id)
                if not raw:
                    self.redis.zrem(ACTIVE_KEY, job_id)  # record expired or purged
                    continue
                record = {_s(k): _s(v) for k, v in raw.items()}
                if not is_job_id(job_id) or record.get("id") != job_id:
                    # written by hand into Redis: never re-driven, never a path
                    log.warning("sweeper: dropped malformed job id %r from the active list", job_id[:80])
                    self.redis.zrem(ACTIVE_KEY, job_id)
                    continue
                records.append(record)
            for record, (waiting, locked) in zip(records, self._waiting_or_locked(records), strict=True):
                if waiting:
                    continue
                job_id = record["id"]
                messages = held.get(job_id, [])
                oldest = min((t for _, t in messages), default=None)
                reason = stalled_reason(record, locked, now, oldest, self.timings)
                if reason is None:
                    continue
                if reason == MAYBE_LOST:
                    maybe_lost.append(record)
                    continue
                restored = self._redrive(record, reason, [tag for tag, _ in messages])
                if reason == "unpublished":
                    result.republished += 1
                else:
                    result.redriven += 1
                    result.restored += int(restored)
        if maybe_lost and self.broker.can_tell_lost_jobs():
            queued = self.broker.queued_job_ids()
            for record in maybe_lost:
                if record["id"] not in queued:
                    self._redrive(record, "lost-job", [])
                    result.redriven += 1
        ended = {j: m for j, m in held.items() if j not in seen}
        result.forgotten = self.broker.forget_finished(ended, now, self.timings.orphan_message)
        result.pruned = self.prune_indexes()
        result.announced = announce_stale(self.redis, self.app, now)
        return result

    def dispatch_slots(self) -> int:
        """Fill free transfer slots from the fair-share waiting lists; returns jobs published.
        With the fair share off (AWORK_FAIR_SHARE=off), every job still waiting is published."""
        fair = self.fair
        return fair_gate.publish(
            self.app, JobStore(self.redis), fair, fair.dispatch() if fair.settings.enabled else fair.drain()
        )

    def _zrange(self, key: str, start: int, end: int) -> list[str]:
        ids: list[bytes] = self.redis.zrange(key, start, end)  # type: ignore[assignment]
        return [_s(i) for i in ids]

    def _waiting_or_locked(self, records: list[dict[str, str]]) -> list[tuple[bool, bool]]:
        """For each record, in one round trip for them all: is the job waiting in its workspace's
        fair-share list for a transfer slot (left alone on purpose), and is any step of it locked
        (a live worker on it)?"""
        if not records:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for record in records:
            job_id = record["id"]
            if record.get("wait_reason") == fair_gate.WAIT_REASON:
                pipe.zscore(waiting_key(record.get("workspace", "")), job_id)
            running = record.get("running")
            pipe.exists(*[step_lock_key(job_id, step) for step in ([running] if running else STEPS)])
        replies = iter(pipe.execute())
        out = []
        for record in records:
            waiting = record.get("wait_reason") == fair_gate.WAIT_REASON and next(replies) is not None
            out.append((waiting, bool(next(replies))))
        return out

    def _redrive(self, record: dict[str, str], reason: str, tags: list[str]) -> bool:
        """Hand the job's lost messages back to their queues, or publish it again; True when
        messages were restored."""
        job_id = record["id"]
        restored = 0
        if reason != "unpublished" and tags:
            restored = self.broker.restore(tags)
        how = f"{restored} message(s) restored"
        if not restored:
            first = resume_step(record)
            canvas_from(self.app, record, first).apply_async()
            how = f"published from {first}"
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(
            job_key(job_id),
            mapping={"redriven_at": repr(time.time()), "published": "1", "redrive_reason": reason},
        )
        pipe.hincrby(job_key(job_id), "redrives", 1)
        pipe.execute()
        log.warning("sweeper: job=%s re-driven (%s): %s", job_id, reason, how)
        return restored > 0

    def prune_indexes(self) -> int:
        """Drop ids whose records have expired (or were purged) from the job index and the dead
        letters: PRUNE_BATCH ids of each a pass, walking round the zset over the passes."""
        removed = 0
        for key in (INDEX_KEY, DEAD_KEY):
            offset = self._prune_offsets.get(key, 0)
            ids = self._zrange(key, offset, offset + PRUNE_BATCH - 1)
            if not ids:
                self._prune_offsets[key] = 0
                continue
            pipe = self.redis.pipeline(transaction=False)
            for job_id in ids:
                pipe.exists(job_key(job_id))
            gone = [i for i, exists in zip(ids, pipe.execute(), strict=True) if not exists]
            if gone:
                self.redis.zrem(key, *gone)
                removed += len(gone)
            kept = len(ids) - len(gone)
            self._prune_offsets[key] = 0 if len(ids) < PRUNE_BATCH else offset + kept
        return removed

    # -- the loop ----------------------------------------------------------------------------
    def _lease(self) -> bool:
        """One sweeper at a time across the fleet; the lease lapses if its holder dies."""
        ttl = max(2, int(self.timings.interval * 2))
        if self.redis.set(SWEEPER_LEASE_KEY, self.token, nx=True, ex=ttl):
            return True
        if self.redis.get(SWEEPER_LEASE_KEY) == self.token.encode():
            self.redis.expire(SWEEPER_LEASE_KEY, ttl)
            return True
        return False

    def run(self) -> None:
        passes = 0
        while not self._stop.wait(self.timings.interval):
            passes += 1
            try:
                self.pass_once(housekeeping=passes % ORPHAN_EVERY_PASSES == 0)
            except Exception:
                log.warning("sweeper pass failed", exc_info=True)
                self.broker.close_connection()
        self.broker.close()

    def idle(self) -> bool:
        """Nothing for a pass to look at (one EXISTS): no unfinished job (a job waiting for a
        transfer slot is one), no message in a worker's hands, no ended job to announce."""
        return not self.redis.exists(ACTIVE_KEY, KOMBU_UNACKED_INDEX_KEY, ENDED_KEY)

    def pass_once(self, housekeeping: bool = False) -> None:
        """One pass, if this process holds the lease. An idle fleet's pass costs one Redis call;
        `housekeeping` passes (pruning the indexes, orphaned staging) run even then."""
        if not housekeeping and self.idle():
            return
        if not self._lease():
            return
        res = self.sweep_once()
        if self.dispatch_slots():
            log.info("sweeper: jobs dispatched into free transfer slots")
        if res.redriven or res.republished or res.pruned or res.forgotten or res.announced:
            log.info("sweeper: %s", res)
        if self.staging_dir is not None and housekeeping:
            remove_orphan_staging(self.redis, self.staging_dir)

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, name="awork-sweeper", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()
        self.broker.close()


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
