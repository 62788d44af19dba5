"""Guards around kombu 5.7 Redis-transport bugs that stop a worker when Redis restarts.

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
hash, where the sweeper (workers.sweeper) moves the ones of unfinished jobs back to their queue
and drops the ones of finished jobs (or kombu's visibility timeout restores them hours later,
to be skipped).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from kombu.exceptions import MessageStateError
from kombu.message import Message
from kombu.transport import redis as kombu_redis

log = logging.getLogger("awork.worker")

_restore_unacked = kombu_redis.QoS.restore_unacked
_ack_log_error = Message.ack_log_error
_reject_log_error = Message.reject_log_error


@functools.wraps(_restore_unacked)
def restore_unacked(self: Any, client: Any = None) -> Any:
    try:
        return _restore_unacked(self, client)
    except AttributeError as exc:
        log.warning(
            "broker connection lost: kombu could not hand %d message(s) back (%s); "
            "they stay unacknowledged in Redis until the sweeper restores them",
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
            "could not ack %s on a closed broker channel (%s); the sweeper clears it", self.delivery_tag, exc
        )


@functools.wraps(_reject_log_error)
def reject_log_error(self: Message, logger: Any, errors: Any, requeue: bool = False) -> None:
    try:
        _reject_log_error(self, logger, errors, requeue=requeue)
    except (AttributeError, MessageStateError) as exc:
        log.warning(
            "could not reject %s on a closed broker channel (%s); the sweeper restores it",
            self.delivery_tag,
            exc,
        )


def install() -> None:
    kombu_redis.QoS.restore_unacked = restore_unacked  # type: ignore[method-assign]
    Message.ack_log_error = ack_log_error  # type: ignore[method-assign]
    Message.reject_log_error = reject_log_error  # type: ignore[method-assign]


install()
