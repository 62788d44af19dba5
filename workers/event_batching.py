"""Task events for Flower, sent in batches: at most one `task.multi` message per worker every
EVENT_FLUSH_SECONDS instead of one per event occasion.

Celery buffers a worker's task events (received, started, succeeded, ...) and, with the event
loop on, flushes that buffer on the loop's next turn after each event: about one PUBLISH, its
JSON and base64 encoding and a cross-thread wake-up of the loop per event, a fifth of a worker's
CPU for small jobs. Here the first event of a batch schedules one flush a moment later, from the
loop thread; the events of every step in between go out with it (Celery still flushes at once
when its buffer reaches its limit, 24 events). Flower shows them that much later; nothing else
reads them. The buffer is flushed before the consumer shuts down.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.worker.consumer import events as consumer_events
from celery.worker.consumer.consumer import Consumer

log = logging.getLogger("awork.worker")

EVENT_FLUSH_SECONDS = 0.25
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


_shutdown = consumer_events.Events.shutdown


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


install()
