"""Which broker carries the step messages: kombu's Redis transport (default) or RabbitMQ.

`BROKER_URL=amqp://user:password@host:5672/vhost` moves the messages to RabbitMQ; Redis (REDIS_URL,
plain or Sentinel) still holds every piece of state (job records, locks, limiter windows, block journal,
idempotency keys, connections). Producers and workers read the same variable through
`celery_config` (producers/broker.py), so both sides publish and consume on the same broker.

On RabbitMQ:
- the step queues are quorum queues (`x-queue-type: quorum`, replicated over Raft) bound to
  topic exchanges, which Celery's native delayed delivery needs;
- countdowns (rate waits, retries, lock rechecks) go through Celery's native delayed delivery
  (the `celery_delayed_*` quorum queues and exchanges, declared by each worker at start), so a
  deferred message waits in RabbitMQ, not in a worker's memory;
- publisher confirms are on: a publish returns once RabbitMQ has the message;
- global QoS is off (quorum queues do not support it; Celery's worker_detect_quorum_queues);
- a retried publish declares its exchange on a live channel after a reconnect, not in a loop of
  fresh connections (`declare_on_the_revived_channel`, a kombu 5.7 fix).

Which code depends on which transport:
- Redis transport only (installed or included only without BROKER_URL): workers/kombu_fixes.py
  (kombu Redis-channel guards), workers/resume.py's ResumeStep (hands back what kombu's
  `unacked` hash held across a reconnect), the sweeper's duties that read
  kombu's `unacked` hash (orphaned messages, finished jobs' unacknowledged messages), the
  producers' direct-to-list fast path (producers/messages.py) and the `unacked_messages` gauge
  (workers/queue_metrics.py). RabbitMQ redelivers a dead consumer's unacknowledged
  messages as soon as its connection closes, and confirms each publish, so none of these is
  needed there.
- Both, done differently: the sweeper's net for a quiet job whose message is nowhere (a job
  with no sign of life, or a countdown long overdue) looks for the message in kombu's lists on
  Redis; on RabbitMQ, whose queues cannot be searched, it acts only while the step queues are
  empty. The `queue_depth` gauge reads kombu's lists on Redis and passive declares on RabbitMQ;
  both RabbitMQ reads go through workers/queue_metrics.py `AmqpQueueDepths`, bounded in time.
- Broker-neutral: everything else, the sweeper's other duties included (records never
  published, steps whose worker died, fair-share slots, stale callbacks).
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlsplit

from kombu import Exchange, Queue

from producers.config import ConfigError, redact_url

AMQP_SCHEMES = frozenset({"amqp", "amqps", "pyamqp"})
QUORUM = {"x-queue-type": "quorum"}
# RabbitMQ connection: AMQP heartbeats find a dead peer (or a dead worker's connection, on the
# broker's side) within about two intervals.
AMQP_HEARTBEAT_SECONDS = 10
AMQP_CONNECT_TIMEOUT_SECONDS = 5.0
NOT_FOUND = 404  # the AMQP reply code of a passive declare naming no queue


def broker_url(redis_url: str) -> str:
    """BROKER_URL (RabbitMQ) when set, else `redis_url`: the state Redis carries the messages too."""
    url = os.environ.get("BROKER_URL", "").strip()
    if not url:
        return redis_url
    if urlsplit(url).scheme not in AMQP_SCHEMES:
        raise ConfigError(
            f"BROKER_URL: expected amqp:// or amqps:// (RabbitMQ), got {redact_url(url)}; "
            "leave it unset and REDIS_URL carries the messages"
        )
    return url


def amqp_broker() -> bool:
    """True when BROKER_URL sends the step messages to RabbitMQ (reads only BROKER_URL)."""
    return is_amqp(broker_url(""))


def is_amqp(url: str) -> bool:
    return urlsplit(url).scheme in AMQP_SCHEMES


def uses_redis_transport(redis_url: str) -> bool:
    """True when step messages go through kombu's Redis transport (the Redis-only code paths)."""
    return not is_amqp(broker_url(redis_url))


def message_priority(level: int) -> int:
    """A kombu priority on the Redis transport's scale (0 is read first, 9 last: producers/priority.py)
    as the broker in use reads it. RabbitMQ reads the other way (higher first; quorum queues of
    RabbitMQ 4 deliver 5 and above as high, 3.x ignore priorities), so it gets 9 - level there."""
    return 9 - level if amqp_broker() else level


def amqp_queues(names: tuple[str, ...]) -> list[Queue]:
    """The step queues as quorum queues on topic exchanges of the same name."""
    return [
        Queue(name, Exchange(name, type="topic"), routing_key=name, queue_arguments=dict(QUORUM))
        for name in names
    ]


def amqp_settings(url: str, queue_names: tuple[str, ...]) -> dict[str, Any]:
    """What changes in the Celery configuration when the broker is RabbitMQ."""
    return {
        "broker_url": url,
        "broker_transport_options": {
            "confirm_publish": True,
            "connect_timeout": AMQP_CONNECT_TIMEOUT_SECONDS,
        },
        "broker_heartbeat": AMQP_HEARTBEAT_SECONDS,
        "task_queues": amqp_queues(queue_names),
        "task_default_queue_type": "quorum",
        "task_create_missing_queue_type": "quorum",
        "task_create_missing_queue_exchange_type": "topic",
        "task_default_exchange_type": "topic",
        "worker_detect_quorum_queues": True,
        "broker_native_delayed_delivery_queue_type": "quorum",
    }


def adjust(config: dict[str, Any], queue_names: tuple[str, ...]) -> dict[str, Any]:
    """`config` (the Redis-transport configuration) for the broker BROKER_URL names."""
    url = broker_url(str(config["broker_url"]))
    if not is_amqp(url):
        return config
    round_up_short_countdowns()
    declare_on_the_revived_channel()
    return {**config, **amqp_settings(url, queue_names)}


def queue_ready(conn: Any, name: str) -> int:
    """Messages ready in one queue; a queue no worker has declared yet holds none. Any other
    refusal (403 ACCESS_REFUSED, 405 RESOURCE_LOCKED, ...) raises: it says nothing of the queue."""
    channel = conn.channel()
    try:
        return int(channel.queue_declare(queue=name, passive=True).message_count)
    except conn.channel_errors as exc:
        if getattr(exc, "code", None) != NOT_FOUND:
            raise
        return 0  # the broker closed this channel
    finally:
        try:
            channel.close()
        except Exception:
            pass


def round_up_short_countdowns() -> None:
    """Celery 5.5-5.7 publishes a countdown through native delayed delivery with `int(countdown)`
    seconds, and kombu's `calculate_routing_key` refuses 0: a countdown under one second (a
    jittered retry, a short rate wait) raised ValueError in `apply_async`, which a retry turns
    into Reject(requeue=False), dropping the job's only message. Such countdowns wait 1 s."""
    import celery.app.base as celery_base

    # A private Celery function, absent from celery-types' stubs.
    current = celery_base.calculate_routing_key  # type: ignore[attr-defined]
    if getattr(current, "rounds_up", False):
        return

    def calculate_routing_key(countdown: int, routing_key: str) -> str:
        return str(current(max(1, int(countdown)), routing_key))

    calculate_routing_key.rounds_up = True  # type: ignore[attr-defined]
    celery_base.calculate_routing_key = calculate_routing_key  # type: ignore[attr-defined]


def declare_on_the_revived_channel() -> None:
    """kombu 5.7's `_imaybe_declare` (a publish with retry=True declaring its exchange, as every
    Celery event dispatcher and task producer does) retries `_maybe_declare(entity, channel)` with
    the channel it was first given. When that channel belongs to an AMQP connection that died
    without being collected (kombu's `Connection.connection` reconnects silently once py-amqp
    marks a socket dead, e.g. in the event loop's heartbeat check), `channel.connection` is still
    set: every retry declared on the dead channel, failed, and `ensure` dropped the fresh
    connection and made another, for ever (thousands of connections a second; seen on a worker's
    event connection, its loop stuck in the worker heartbeat's publish). Here each try declares
    on the entity's own channel, which `ensure` revives onto the fresh connection."""
    import kombu.common as kombu_common

    # Private kombu functions: a narrow stand-in for one of them, kept in kombu's module.
    current = kombu_common._imaybe_declare
    if getattr(current, "revived_channel", False):
        return
    ensure_bound = kombu_common._ensure_channel_is_bound
    declare = kombu_common._maybe_declare
    disconnected = kombu_common.RecoverableConnectionError  # type: ignore[attr-defined]  # py-amqp's

    def _imaybe_declare(entity: Any, channel: Any, **retry_policy: Any) -> Any:
        entity = ensure_bound(entity, channel)
        if not entity.channel.connection and getattr(channel, "connection", None):
            entity.revive(channel)
        if not entity.channel.connection:
            raise disconnected("channel disconnected")

        def declare_on_own_channel() -> Any:
            return declare(entity, entity.channel)

        return entity.channel.connection.client.ensure(entity, declare_on_own_channel, **retry_policy)()

    _imaybe_declare.revived_channel = True  # type: ignore[attr-defined]
    kombu_common._imaybe_declare = _imaybe_declare
