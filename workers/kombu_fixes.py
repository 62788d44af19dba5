"""Guards around kombu 5.7 Redis-transport bugs that stop or hang a worker when Redis restarts.

When the broker connection drops, Celery closes it and reconnects. Two things then fail inside
kombu with an AttributeError instead of a connection error, which Celery takes for an
"Unrecoverable error": the worker process exits instead of reconnecting (the fault soak lost all
three workers to one Redis SIGKILL + restart):

1. The channel's close hands the messages it holds back to their queue
   (`QoS.restore_unacked`), but by then the channel has dropped its connection pool and the
   connection its client: `'NoneType' object has no attribute 'hostname'` (redis.py
   `_connparams`; the family of celery/kombu#582 and #970).
2. A step that was running when the connection dropped finishes later and acknowledges its
   message on that closed channel: `'NoneType' object has no attribute 'client'`.

Both are turned into warnings. Nothing is lost by that: the messages stay in Redis' `unacked`
hash; the worker notes the failed acks and rejects (workers/resume.py) and settles them, with
what its channel held, as soon as it is connected again. The sweeper (workers.sweeper) remains
the net for workers that die. And a message that BRPOP took from its queue just as the
connection dropped, before kombu could record it in `unacked`, is noted with its body
(`append_or_note`) and published again, instead of being held nowhere.

3. The hang (issue #12). The consumer loop reads the pub/sub connection (broadcasts: pings,
   `celery inspect`, control) in `Channel._receive_one` with `PubSub.parse_response()`, whose
   default is `block=True`. Found with the worker's stack and Redis' CLIENT LIST after a Redis
   SIGKILL + restart (one worker in a few restarts):
   - the event loop saw the old socket readable: its EOF;
   - redis-py's retry layer (`PubSub._execute` -> `call_with_retry` -> `_reconnect`) reconnected
     *inside* that call, to the restarted Redis;
   - redis-py re-subscribes a PubSub from a connect callback that it registers only when the
     PubSub opens its connection itself; kombu's `MultiChannelPoller._client_registered` sets
     `client.connection` itself, so nothing re-subscribed: Redis listed that connection with
     `psub=0 cmd=client` (the handshake, then nothing);
   - and since redis-py 8 a blocking pub/sub read has no timeout at all, whatever
     `socket_timeout` says (redis/redis-py#4098, made the documented behaviour by
     redis/redis-py#4119), so the loop waited for ever on a connection that would never
     receive a byte: `on_readable -> _receive -> _receive_one -> parse_response -> _execute ->
     try_read -> read_response -> sock.recv_into`. Tasks, heartbeats and pings stopped with it
     (the same stack as celery/celery#2606).
   `bounded_pubsub_reads` makes those reads non-blocking: read only when a reply is there
   (`can_read(0)`, which reports the EOF as a connection error, outside the retry layer, so
   Celery makes a fresh connection and kombu subscribes it), and give a reply that has begun at
   most the transport's `socket_timeout`. The rest of the cure is in the broker transport
   options (producers/broker.py): socket and connect timeouts, TCP keepalive and health
   checks, so that no other broker read can wait for ever either.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from queue import Empty
from typing import Any

from kombu.exceptions import MessageStateError
from kombu.message import Message
from kombu.transport import redis as kombu_redis

from producers.transport import amqp_broker
from workers.resume import LEDGER, running_tags

log = logging.getLogger("awork.worker")

_restore_unacked = kombu_redis.QoS.restore_unacked
_ack_log_error = Message.ack_log_error
_reject_log_error = Message.reject_log_error
_receive_one = kombu_redis.Channel._receive_one  # type: ignore[attr-defined]  # private, not in the stubs
_qos_append = kombu_redis.QoS.append
# Used when the transport options set no socket_timeout.
PUBSUB_READ_TIMEOUT_SECONDS = 10.0


@functools.wraps(_restore_unacked)
def restore_unacked(self: Any, client: Any = None) -> Any:
    if LEDGER.reconnecting:
        # A lost connection, not a shutdown: messages of steps still running stay in `unacked`
        # for the ledger (workers/resume.py), which hands each back once its step has ended.
        for tag in running_tags() & set(getattr(self, "_delivered", {}) or {}):
            self._delivered.pop(tag, None)
    try:
        return _restore_unacked(self, client)
    except AttributeError as exc:
        log.warning(
            "broker connection lost: kombu could not hand %d message(s) back (%s); "
            "they stay unacknowledged in Redis until this worker reconnects and restores them",
            len(getattr(self, "_delivered", {}) or {}),
            exc,
        )
        return None


@functools.wraps(_ack_log_error)
def ack_log_error(self: Message, logger: Any, errors: Any, multiple: bool = False) -> None:
    try:
        _ack_log_error(self, logger, errors, multiple=multiple)
    except (AttributeError, MessageStateError) as exc:
        log.warning(
            "could not ack %s on a closed broker channel (%s); cleared after the reconnect",
            self.delivery_tag,
            exc,
        )
        if self.delivery_tag is not None:  # always set on a received message
            LEDGER.note_failed(self.delivery_tag, requeue=None)


@functools.wraps(_reject_log_error)
def reject_log_error(self: Message, logger: Any, errors: Any, requeue: bool = False) -> None:
    try:
        _reject_log_error(self, logger, errors, requeue=requeue)
    except (AttributeError, MessageStateError) as exc:
        log.warning(
            "could not reject %s on a closed broker channel (%s); settled after the reconnect",
            self.delivery_tag,
            exc,
        )
        if self.delivery_tag is not None:
            LEDGER.note_failed(self.delivery_tag, requeue=requeue)


@functools.wraps(_qos_append)
def append_or_note(self: Any, message: Any, delivery_tag: str) -> Any:
    """kombu records a delivered message in `unacked` after BRPOP took it from its queue; if
    the connection drops in between, Redis holds the message nowhere. Note it, so the worker
    publishes it again once reconnected (workers/resume.py), then fail as before."""
    try:
        return _qos_append(self, message, delivery_tag)
    except self.channel.connection_errors:
        delivery = message.delivery_info
        LEDGER.note_unrecorded(delivery_tag, message._raw, delivery["exchange"], delivery["routing_key"])
        log.warning("broker connection lost while recording message %s; it is published again", delivery_tag)
        raise


class _BoundedPubSub:
    """The channel's PubSub, but `parse_response()` never blocks for longer than `timeout`."""

    def __init__(self, pubsub: Any, timeout: float) -> None:
        self._pubsub = pubsub
        self._timeout = timeout

    def parse_response(self, block: bool = True, timeout: float = 0) -> Any:
        return self._pubsub.parse_response(block=False, timeout=self._timeout)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pubsub, name)


@functools.wraps(_receive_one)
def bounded_pubsub_reads(self: Any, c: Any) -> Any:
    """kombu's `_receive_one`, reading only when a reply is there, and then with a timeout."""
    conn = c.connection
    if conn is not None:
        try:
            ready = conn.can_read(timeout=0)
        except self.connection_errors:
            self._in_listen = None
            raise
        if not ready:
            raise Empty()
    timeout = self.socket_timeout or PUBSUB_READ_TIMEOUT_SECONDS
    return _receive_one(self, _BoundedPubSub(c, timeout))


@contextlib.contextmanager
def reused_client(self: Any, client: Any = None) -> Iterator[Any]:
    """kombu's `conn_or_acquire`, keeping one Redis client object per channel and connection
    pool instead of building one for every publish, ack and event (kombu builds a new
    `redis.Redis` each time, ~0.3 ms of CPU for its response-callback tables alone, about a
    dozen times per job). A client object holds no connection of its own (they come from the
    pool for each command), so one is safely shared by the threads of the channel."""
    if client:
        yield client
        return
    pool = self.pool
    cached = self.__dict__.get("_awork_client")
    if cached is None or cached.connection_pool is not pool:
        cached = self._create_client()
        self.__dict__["_awork_client"] = cached
    yield cached


@contextlib.contextmanager
def plain_pipeline(self: Any, pipe: Any = None, client: Any = None) -> Iterator[Any]:
    """kombu's `QoS.pipe_or_acquire` without MULTI/EXEC. Its only callers without a pipe of their
    own are the bookkeeping of each delivered message (ZADD to the unacked index, HSET of the
    message) and of its ack or reject (ZREM, HDEL): one round trip either way, but wrapped in a
    transaction the pair costs Redis four commands instead of two, twice per task (12 of the 39
    commands of Celery's own floor for a job). Nothing needs the transaction: both commands
    arrive in one write and Redis runs them in order; the restore paths that do need one
    (`restore_by_tag`, `_restore`) open their own and pass it in."""
    if pipe:
        yield pipe
        return
    with self.channel.conn_or_acquire(client) as acquired:
        yield acquired.pipeline(transaction=False)


def install() -> None:
    kombu_redis.QoS.pipe_or_acquire = plain_pipeline  # type: ignore[method-assign]
    kombu_redis.Channel.conn_or_acquire = reused_client  # type: ignore[method-assign]
    kombu_redis.Channel._receive_one = bounded_pubsub_reads  # type: ignore[attr-defined]
    kombu_redis.QoS.append = append_or_note  # type: ignore[method-assign]
    kombu_redis.QoS.restore_unacked = restore_unacked  # type: ignore[method-assign]
    Message.ack_log_error = ack_log_error  # type: ignore[method-assign]
    Message.reject_log_error = reject_log_error  # type: ignore[method-assign]


# kombu's Redis transport only: RabbitMQ (BROKER_URL) needs none of it (producers/transport.py).
if not amqp_broker():
    install()
