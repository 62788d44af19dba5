"""The sweeper: finds jobs whose step was lost with its worker and re-drives them.

Redis only hands an unacknowledged message to another worker after the visibility timeout
(hours, since it must stay above the longest step). So every worker runs this loop, and one at a
time (a Redis lease) looks at the unfinished jobs:

- a step marked `running` whose lock has expired and whose heartbeat is older than STALL_SECONDS:
  its worker died mid-step;
- a countdown (rate wait or error retry) whose `wait_until` passed LOST_COUNTDOWN_SECONDS ago
  with no activity since: the worker holding the deferred message died;
- a message delivered to a worker (in kombu's `unacked` hash) more than ORPHAN_MESSAGE_SECONDS
  ago, for a job with no step locked, no countdown pending and no activity since: its worker
  died after taking the message and before marking the step running (or while it held the
  message for a thread);
- a record still `published=0` after UNPUBLISHED_SECONDS: its producer died between record and
  message;
- (a job waiting in its workspace's fair-share list for a transfer slot has no message on
  purpose: it is left alone while it is listed there; workers/fair_share.py)
- a job with no activity for IDLE_SECONDS, no step locked, no countdown pending, no message in
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
queues cannot be searched for it). The other duties do not depend on the broker.

Each pass also fills free transfer slots from the fair-share waiting lists (a wake-up lost with
a worker, or slots a new worker brought).

It also keeps Redis from growing: ids of expired records leave the job index and the dead
letters (PRUNE_BATCH a pass), unacknowledged messages of jobs that have ended are dropped, and
staged bytes of jobs that are done, or whose record is gone, are removed (every
ORPHAN_EVERY_PASSES passes).

Timings come from the environment (seconds), for tests and the fault soak:
AWORK_SWEEPER_INTERVAL (15), AWORK_SWEEPER_STALL (45), AWORK_SWEEPER_LOST_COUNTDOWN (120),
AWORK_SWEEPER_UNPUBLISHED (60), AWORK_SWEEPER_IDLE (180), AWORK_SWEEPER_COOLDOWN (300: a job is
re-driven at most once in this long). With the step lock's defaults (TTL 60 s, heartbeat 10 s)
a step lost with a SIGKILLed worker resumes elsewhere within about 75 s.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from celery import Celery

from producers import staging
from producers.block_digests import SUFFIX as SIDECAR_SUFFIX
from producers.broker import celery_config
from producers.config import env_float
from producers.contract import QUEUE_API, QUEUE_TRANSFER, JobState
from producers.endings import announce_stale
from producers.job_ids import is_job_id
from producers.records import ACTIVE_KEY, DEAD_KEY, INDEX_KEY, STEPS, JobStore, job_key, step_lock_key
from producers.redrive import canvas_from, resume_step
from producers.transport import ready_messages, uses_redis_transport
from workers import fair_gate
from workers.fair_share import FairSettings, FairShare, waiting_key
from workers.queue_metrics import BrokerLayout
from workers.step_lock import LOCK_TTL_SECONDS

log = logging.getLogger("awork.sweeper")


INTERVAL_SECONDS = env_float("AWORK_SWEEPER_INTERVAL", 15.0)
STALL_SECONDS = env_float("AWORK_SWEEPER_STALL", 45.0)  # a heartbeat this old: the worker is gone
LOST_COUNTDOWN_SECONDS = env_float("AWORK_SWEEPER_LOST_COUNTDOWN", 120.0)  # a countdown this overdue
UNPUBLISHED_SECONDS = env_float("AWORK_SWEEPER_UNPUBLISHED", 60.0)
REDRIVE_COOLDOWN_SECONDS = env_float("AWORK_SWEEPER_COOLDOWN", 300.0)
IDLE_SECONDS = env_float("AWORK_SWEEPER_IDLE", 180.0)  # no sign of life and no message anywhere
# A message held this long by a worker with nothing to show for it in the record is lost. Above
# the 20 s countdown a step takes when it finds its lock held elsewhere (which sets no
# `wait_until`), so a live worker's deferred copy is not taken for a lost one.
ORPHAN_MESSAGE_SECONDS = max(STALL_SECONDS, 30.0)
ORPHAN_AGE_SECONDS = 3600.0
ORPHAN_EVERY_PASSES = 40  # about every 10 minutes at the default interval
LEASE_KEY = "awork:sweeper:lease"
BATCH = 500
PRUNE_BATCH = 500
# kombu's Redis transport: delivered, unacknowledged messages (tag -> [payload, exchange,
# routing key]) and their delivery times (tag -> unix time).
UNACKED_KEY = "unacked"
UNACKED_INDEX_KEY = "unacked_index"


MAYBE_LOST = "maybe-lost"


@dataclass
class SweepResult:
    scanned: int = 0
    redriven: int = 0
    restored: int = 0  # of those, lost messages moved back to their queue
    republished: int = 0
    pruned: int = 0
    forgotten: int = 0  # unacknowledged messages of finished jobs dropped
    announced: int = 0  # callbacks of ended jobs that a dead process had not announced


def _f(record: dict[str, str], name: str) -> float:
    try:
        return float(record.get(name) or 0)
    except ValueError:
        return 0.0


def stalled_reason(
    record: dict[str, str], lock_held: bool, now: float, oldest_message: float | None = None
) -> str | None:
    """Why this unfinished job needs re-driving, or None.

    `oldest_message`: when the oldest message of this job that sits unacknowledged in a
    worker's hands was delivered (None: no such message).
    """
    if record.get("state") in ("done", "failed", "dead", "canceled"):
        return None
    if now - _f(record, "redriven_at") < REDRIVE_COOLDOWN_SECONDS:
        return None
    last_activity = max(_f(record, "heartbeat_at"), _f(record, "updated_at"))
    if record.get("published") == "0":
        if now - _f(record, "created_at") > UNPUBLISHED_SECONDS:
            return "unpublished"
        return None
    if lock_held:
        return None
    if record.get("running"):
        if now - last_activity > STALL_SECONDS:
            return f"lost-{record['running']}"
        return None
    wait_until = _f(record, "wait_until")
    if wait_until and now - wait_until <= LOST_COUNTDOWN_SECONDS:
        return None  # a countdown that may still be pending
    if wait_until and last_activity < wait_until:
        # The countdown is long over and nothing ran since: the worker holding the deferred
        # message died (or, with no message held anywhere, it waits in a queue or is lost).
        return "lost-countdown" if oldest_message is not None else MAYBE_LOST
    if oldest_message is not None:
        if now - oldest_message > ORPHAN_MESSAGE_SECONDS and now - last_activity > ORPHAN_MESSAGE_SECONDS:
            return "lost-message"
        return None
    if now - last_activity > IDLE_SECONDS:
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


class Sweeper:
    def __init__(self, client: redis.Redis, redis_url: str, staging_dir: Path | None = None) -> None:
        self.redis = client
        self.staging_dir = staging_dir
        self.app = Celery("awork-sweeper", set_as_current=False)
        self.app.conf.update(celery_config(redis_url))
        self.token = f"{time.time()}-{id(self)}"
        self._stop = threading.Event()
        self._prune_offsets: dict[str, int] = {}
        self._conn: Any = None
        self.fair = FairShare(client, LOCK_TTL_SECONDS, FairSettings.from_env())
        # kombu's Redis transport: read its `unacked` hash and queue lists (producers/transport.py).
        self.redis_transport = uses_redis_transport(redis_url)

    # -- one pass ----------------------------------------------------------------------------
    def sweep_once(self, now: float | None = None) -> SweepResult:
        now = time.time() if now is None else now
        result = SweepResult()
        held = self.unacked_messages() if self.redis_transport else {}
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
                reason = stalled_reason(record, locked, now, oldest)
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
        if maybe_lost and (
            self.redis_transport or ready_messages(self.app, (QUEUE_API, QUEUE_TRANSFER)) == 0
        ):
            queued = self.queued_job_ids() if self.redis_transport else set()
            for record in maybe_lost:
                if record["id"] not in queued:
                    self._redrive(record, "lost-job", [])
                    result.redriven += 1
        result.forgotten = self.forget_finished({j: m for j, m in held.items() if j not in seen}, now)
        result.pruned = self.prune_indexes()
        result.announced = announce_stale(self.redis, self.app, now)
        return result

    def forget_finished(self, held: dict[str, list[tuple[str, float]]], now: float) -> int:
        """Drop unacknowledged messages of jobs that have ended (or whose record is gone), held
        longer than ORPHAN_MESSAGE_SECONDS: left behind by a worker that died or lost its
        connection before its ack. Delivered again they would only be skipped; without this they
        would sit in Redis until the visibility timeout."""
        if not held:
            return 0
        jobs = list(held)
        pipe = self.redis.pipeline(transaction=False)
        for job_id in jobs:
            pipe.hget(job_key(job_id), "state")
        finished = {"done", "failed", "dead", "canceled"}
        tags = [
            tag
            for job_id, state in zip(jobs, pipe.execute(), strict=True)
            if state is None or _s(state) in finished
            for tag, delivered in held[job_id]
            if now - delivered > ORPHAN_MESSAGE_SECONDS
        ]
        if tags:
            pipe = self.redis.pipeline(transaction=True)
            pipe.zrem(UNACKED_INDEX_KEY, *tags)
            pipe.hdel(UNACKED_KEY, *tags)
            pipe.execute()
        return len(tags)

    def dispatch_slots(self) -> int:
        """Fill free transfer slots from the fair-share waiting lists; returns jobs published.
        With the fair share off (AWORK_FAIR_SHARE=off), every job still waiting is published."""
        fair = self.fair
        return fair_gate.publish(
            self.app, JobStore(self.redis), fair, fair.dispatch() if fair.settings.enabled else fair.drain()
        )

    def queued_job_ids(self) -> set[str]:
        """Job ids of every message waiting in the step queues (every priority's list)."""
        out: set[str] = set()
        layout = BrokerLayout()
        for queue in [key for q in (QUEUE_API, QUEUE_TRANSFER) for key in layout.list_keys(q)]:
            start = 0
            while True:
                raws: list[bytes] = self.redis.lrange(queue, start, start + BATCH - 1)  # type: ignore[assignment]
                for raw in raws:
                    job_id = payload_job_id(raw)
                    if job_id:
                        out.add(job_id)
                if len(raws) < BATCH:
                    break
                start += BATCH
        return out

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

    def unacked_messages(self) -> dict[str, list[tuple[str, float]]]:
        """job id -> (delivery tag, delivered at) of its messages that workers hold unacknowledged
        (running, waiting for a thread or for their countdown, or lost with their worker)."""
        index: list[tuple[bytes, float]] = self.redis.zrange(UNACKED_INDEX_KEY, 0, -1, withscores=True)  # type: ignore[assignment]
        out: dict[str, list[tuple[str, float]]] = {}
        if not index:
            return out
        tags = [_s(t) for t, _ in index]
        raws: list[bytes | None] = self.redis.hmget(UNACKED_KEY, tags)  # type: ignore[assignment]
        for (_, delivered), tag, raw in zip(index, tags, raws, strict=True):
            job_id = message_job_id(raw) if raw else None
            if job_id:
                out.setdefault(job_id, []).append((tag, float(delivered)))
        return out

    def _redrive(self, record: dict[str, str], reason: str, tags: list[str]) -> bool:
        """Hand the job's lost messages back to their queues, or publish it again; True when
        messages were restored."""
        job_id = record["id"]
        restored = 0
        if reason != "unpublished" and tags:
            restored = self._restore(tags)
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

    def _restore(self, tags: list[str]) -> int:
        """Move unacknowledged messages back to the head of their queues (kombu's restore)."""
        restored = 0
        try:
            if self._conn is None:
                self._conn = self.app.connection_for_write()
            qos = self._conn.default_channel.qos
            for tag in tags:
                if self.redis.hexists(UNACKED_KEY, tag):
                    qos.restore_by_tag(tag)
                    restored += 1
        except Exception:
            log.warning("sweeper: could not restore messages %s", tags, exc_info=True)
            self._close_conn()
        return restored

    def _close_conn(self) -> None:
        if self._conn is not None:
            try:
                self._conn.release()
            except Exception:
                log.debug("sweeper: closing its broker connection failed", exc_info=True)
            self._conn = None

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
        ttl = max(2, int(INTERVAL_SECONDS * 2))
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
                    if self.dispatch_slots():
                        log.info("sweeper: jobs dispatched into free transfer slots")
                    if res.redriven or res.republished or res.pruned or res.forgotten or res.announced:
                        log.info("sweeper: %s", res)
                    if self.staging_dir is not None and passes % ORPHAN_EVERY_PASSES == 0:
                        remove_orphan_staging(self.redis, self.staging_dir)
            except Exception:
                log.warning("sweeper pass failed", exc_info=True)
                self._close_conn()
        self._close_conn()

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, name="awork-sweeper", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()


def remove_orphan_staging(client: redis.Redis, root: Path, min_age: float = ORPHAN_AGE_SECONDS) -> int:
    """Remove job folders in staging (and their block MD5s) whose job is done, or whose record
    is gone (expired or purged). Failed and dead jobs keep their bytes for `awork-uploads dead retry`.

    Only folders older than `min_age`: a producer stages the bytes just before it writes the
    record, and that moment must not look like an orphan.
    """
    if not root.is_dir():
        return 0
    cutoff = time.time() - min_age
    found: set[str] = set()
    for child in root.iterdir():
        # a job's folder, or its block MD5s (producers.block_digests) left without one
        job_id = child.name.removesuffix(SIDECAR_SUFFIX) if child.is_file() else child.name
        ours = child.is_dir() or child.name.endswith(SIDECAR_SUFFIX)
        if ours and is_job_id(job_id) and child.stat(follow_symlinks=False).st_mtime <= cutoff:
            found.add(job_id)
    candidates = sorted(found)
    removed = 0
    for i in range(0, len(candidates), BATCH):
        chunk = candidates[i : i + BATCH]
        pipe = client.pipeline(transaction=False)
        for job_id in chunk:
            pipe.hget(job_key(job_id), "state")
        for job_id, state in zip(chunk, pipe.execute(), strict=True):
            if state is None or _s(state) in (JobState.DONE.value, JobState.CANCELED.value):
                staging.remove_job_dir(root, job_id)
                removed += 1
    return removed


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
