"""What the broker holds, as the sweeper (workers/sweeper.py) needs to know it.

On kombu's Redis transport: the messages workers hold unacknowledged (the `unacked` hash and its
index of delivery times), the job ids waiting in the step queues' lists, and kombu's own restore
of a held message to the head of its queue. On RabbitMQ none of that can be read: a dead
consumer's messages come back when its connection closes, and the queues cannot be searched, so
only their depth is read (within a bounded time, workers/queue_metrics.py `AmqpQueueDepths`).
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from celery import Celery

from producers.contract import QUEUE_API, QUEUE_TRANSFER
from producers.keys import KOMBU_UNACKED_INDEX_KEY, KOMBU_UNACKED_KEY, job_key
from producers.transport import broker_url, is_amqp
from workers.queue_metrics import AmqpQueueDepths, BrokerLayout
from workers.sweeper_rules import FINISHED, message_job_id, payload_job_id

log = logging.getLogger("awork.sweeper")

BATCH = 500
Held = dict[str, list[tuple[str, float]]]
"""job id -> (delivery tag, delivered at) of the messages workers hold for it."""


class BrokerMessages:
    def __init__(self, client: redis.Redis, app: Celery, redis_url: str) -> None:
        """`app` publishes restores; where the messages are is read once from `redis_url` and
        BROKER_URL (producers.transport.broker_url)."""
        self.redis = client
        self.app = app
        url = broker_url(redis_url)
        self.redis_transport = not is_amqp(url)
        self._conn: Any = None  # a kombu connection, for restores
        self._rabbit_queues = (
            None if self.redis_transport else AmqpQueueDepths(url, (QUEUE_API, QUEUE_TRANSFER))
        )

    def unacked(self) -> Held:
        """Messages that workers hold unacknowledged (running, waiting for a thread or for their
        countdown, or lost with their worker), by job; none known on RabbitMQ."""
        if not self.redis_transport:
            return {}
        index: list[tuple[bytes, float]] = self.redis.zrange(KOMBU_UNACKED_INDEX_KEY, 0, -1, withscores=True)  # type: ignore[assignment]
        out: Held = {}
        if not index:
            return out
        tags = [_s(t) for t, _ in index]
        raws: list[bytes | None] = self.redis.hmget(KOMBU_UNACKED_KEY, tags)  # type: ignore[assignment]
        for (_, delivered), tag, raw in zip(index, tags, raws, strict=True):
            job_id = message_job_id(raw) if raw else None
            if job_id:
                out.setdefault(job_id, []).append((tag, float(delivered)))
        return out

    def can_tell_lost_jobs(self) -> bool:
        """Whether a quiet job with no message in a worker's hands can be told lost: on Redis by
        searching the queue lists (queued_job_ids); RabbitMQ's queues cannot be searched, so only
        while it answers, within AmqpQueueDepths' timeout, that the step queues hold nothing. A
        broker that does not answer means "not known", and the pass goes on without waiting."""
        if self._rabbit_queues is None:
            return True
        try:
            return sum(self._rabbit_queues.read().values()) == 0
        except Exception as exc:
            log.warning("sweeper: cannot read the step queues from RabbitMQ: %s", type(exc).__name__)
            return False

    def queued_job_ids(self) -> set[str]:
        """Job ids of every message waiting in the step queues (every priority's list); none
        on RabbitMQ, where can_tell_lost_jobs() says the queues are empty."""
        out: set[str] = set()
        if not self.redis_transport:
            return out
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

    def forget_finished(self, held: Held, now: float, older_than: float) -> int:
        """Drop unacknowledged messages of jobs that have ended (or whose record is gone), held
        longer than `older_than` seconds: left behind by a worker that died or lost its
        connection before its ack. Delivered again they would only be skipped; without this they
        would sit in Redis until the visibility timeout."""
        if not held:
            return 0
        jobs = list(held)
        pipe = self.redis.pipeline(transaction=False)
        for job_id in jobs:
            pipe.hget(job_key(job_id), "state")
        tags = [
            tag
            for job_id, state in zip(jobs, pipe.execute(), strict=True)
            if state is None or _s(state) in FINISHED
            for tag, delivered in held[job_id]
            if now - delivered > older_than
        ]
        if tags:
            pipe = self.redis.pipeline(transaction=True)
            pipe.zrem(KOMBU_UNACKED_INDEX_KEY, *tags)
            pipe.hdel(KOMBU_UNACKED_KEY, *tags)
            pipe.execute()
        return len(tags)

    def restore(self, tags: list[str]) -> int:
        """Move unacknowledged messages back to the head of their queues (kombu's restore)."""
        restored = 0
        try:
            if self._conn is None:
                self._conn = self.app.connection_for_write()
            qos = self._conn.default_channel.qos
            for tag in tags:
                if self.redis.hexists(KOMBU_UNACKED_KEY, tag):
                    qos.restore_by_tag(tag)
                    restored += 1
        except Exception:
            log.warning("sweeper: could not restore messages %s", tags, exc_info=True)
            self.close_connection()
        return restored

    def close_connection(self) -> None:
        if self._conn is not None:
            try:
                self._conn.release()
            except Exception:
                log.debug("sweeper: closing its broker connection failed", exc_info=True)
            self._conn = None

    def close(self) -> None:
        self.close_connection()
        if self._rabbit_queues is not None:
            self._rabbit_queues.close()


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
