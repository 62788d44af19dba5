"""Task events for Flower, sent in batches: at most one `task.multi` message per worker every
EVENT_FLUSH_SECONDS instead of one per event occasion.

Celery buffers a worker's task events (received, started, succeeded, ...) and, with the event
loop on, flushes that buffer on the loop's next turn after each event: about one PUBLISH, its
JSON and base64 encoding and a cross-thread wake-up of the loop per event, a fifth of a worker's
CPU for small jobs. Here the first event of a batch schedules one flush a moment later, from the
loop thread; the events of every step in between go out with it (however many: Celery's own
flush at 24 buffered events is turned off, see below). Flower shows them that much later; nothing else
reads them. The buffer is flushed before the consumer shuts down.

Every flush happens on the loop thread, never in a pool thread (`keep_flushes_on_the_loop`).
Celery flushes inline in the thread that buffers the 24th event, which with the threads pool is a
pool thread running a task's `on_success`; on RabbitMQ that thread then publishes on the event
dispatcher's connection and, with publisher confirms on (producers/transport.py), reads the
socket for the broker's Basic.Ack, while the loop thread reads the same socket (Celery registers
that connection with the loop so the broker's heartbeats are consumed). py-amqp's reads are not
thread-safe: the loop consumed the Ack (or half a frame), the pool thread waited for ever for a
method frame that never came, holding the dispatcher's mutex; the loop's next event (a
task-received, a flush, the worker heartbeat) blocked on that mutex, so the loop stopped consuming
and sending AMQP heartbeats until RabbitMQ closed both connections for missed heartbeats 20-30 s
later (and then, on the worker-heartbeat's reconnect path, it could spin reconnecting for good).
The batching above made the 24-event case common (a 0.25 s window instead of one loop turn).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from celery.worker.consumer import events as consumer_events
from celery.worker.consumer.consumer import Consumer

log = logging.getLogger("awork.worker")

EVENT_FLUSH_SECONDS = 0.25
# The dispatcher's buffer limit with the loop on: never reached, so a pool thread never flushes.
LOOP_ONLY_BUFFER_LIMIT = sys.maxsize
_PENDING = "_awork_events_flush_pending"


def on_send_event_buffered(self: Any) -> None:
    """Called by the dispatcher (in any thread) after it buffered an event."""
    hub = self.hub
    if hub is None or getattr(self, _PENDING, False):
        return
    setattr(self, _PENDING, True)
    # call_soon is safe from any thread; the timer is the loop thread's own
    hub.call_soon(lambda: hub.call_later(EVENT_FLUSH_SECONDS, _flush, self))


def _flush(consumer: Any) -> None:
    setattr(consumer, _PENDING, False)  # before the flush: an event sent during it schedules anew
    consumer._flush_events()


def keep_flushes_on_the_loop(dispatcher: Any) -> None:
    """Buffered task events are sent only by the loop thread's flush (`_flush` above), whatever
    the number buffered: a pool thread only appends to the buffer (Celery's buffer is built for
    appends from other threads during a flush) and asks the loop for a flush. The loop thread is
    then the only one to publish on, and read from, the dispatcher's connection."""
    dispatcher.buffer_limit = LOOP_ONLY_BUFFER_LIMIT


_start = consumer_events.Events.start
_shutdown = consumer_events.Events.shutdown


def start_loop_flushed(self: Any, c: Any) -> None:
    """Celery's Events.start (a new dispatcher on every broker (re)connect), whose buffered task
    events only the loop thread sends. Without a loop (no hub) Celery buffers nothing: unchanged."""
    _start(self, c)
    dispatcher = getattr(c, "event_dispatcher", None)
    if dispatcher is not None and getattr(c, "hub", None) is not None:
        keep_flushes_on_the_loop(dispatcher)


def shutdown_flushed(self: Any, c: Any) -> None:
    """Send what is buffered before the consumer's event dispatcher closes."""
    dispatcher = getattr(c, "event_dispatcher", None)
    if dispatcher is not None:
        try:
            dispatcher.flush()
        except Exception:
            log.debug("could not send the last task events", exc_info=True)
    _shutdown(self, c)


def install() -> None:
    # Patching Celery's classes in place (the batching is done by its own hook, on_send_event_buffered).
    Consumer.on_send_event_buffered = on_send_event_buffered  # type: ignore[method-assign,assignment]
    consumer_events.Events.shutdown = shutdown_flushed  # type: ignore[method-assign]
    consumer_events.Events.start = start_loop_flushed  # type: ignore[method-assign]


install()
