"""Fast resumption after a broker outage: a worker hands back the messages it held, by itself.

When the broker connection drops, Celery drops the connection's channel and, with it, its
memory of what it held: countdowns waiting in the timer are forgotten, and the acks and
rejects of steps still running fail on the closed channel (workers/kombu_fixes.py). kombu
cannot hand those messages back either (the closed channel has no connection left), so they
stay in Redis' `unacked` hash and, before this module, only the sweeper got them going again,
after its stall timeout (about two minutes in production), while the workers sat idle.

So the worker keeps a small ledger of delivery tags (`Ledger`):

- when the consumer stops for a reconnect (`ResumeStep.stop`, before the channel closes), every
  tag its channel holds unacknowledged is noted: `restore` for messages no step is running on
  (countdowns, messages waiting for a thread), `running` for the others;
- a message taken from its queue just as the connection dropped, whose `unacked` entry could
  not be written (kombu's BRPOP-then-record window), is noted with its body (`republish`);
- a step that ends while the connection is down has its ack or reject fail on the closed
  channel: kombu_fixes reports it here, and its tag becomes `forget` (an ack) or `restore`
  (a reject that asked for a requeue);
- kombu's own hand-back when the old channel closes skips the messages of running steps (it
  would put a second copy in the queue while the first still runs; that copy then finds the
  step locked and waits a 20 s recheck, even when the first is about to requeue);
- once the consumer is connected again (`ResumeStep.start`), and whenever a late ack or reject
  comes in after that, the ledger is settled on the live channel: `restore` moves the message
  from `unacked` back to the head of its queue with kombu's own `restore_by_tag` (atomic: a tag
  that is gone, because the sweeper or kombu got to it first, is a no-op), `forget` removes it
  from `unacked`.

Every step is idempotent and fenced by its step lock (workers/step_lock.py), so a message handed
back while a copy still runs elsewhere costs a skipped run, never a second upload. The sweeper
stays the net for workers that die. Redis transport only (`unacked` is its ack emulation): with
BROKER_URL on RabbitMQ the step is not included.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from typing import Any

from celery import bootsteps

from producers.transport import is_amqp

log = logging.getLogger("awork.worker")

RESTORE = "restore"
FORGET = "forget"
RUNNING = "running"
REPUBLISH = "republish"


class Ledger:
    """Delivery tags held across a broker reconnect, and what to do with each."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tags: dict[str, str] = {}
        self._lost: dict[str, tuple[Any, str, str]] = {}  # tag -> (payload, exchange, routing key)
        self._qos: Any = None  # the live channel's QoS, once connected
        # True between a connection loss and the reconnect: kombu's restore at channel close then
        # leaves running steps' messages to the ledger (workers/kombu_fixes.py).
        self.reconnecting = False

    def note_held(self, held: Iterable[str], running: Iterable[str]) -> None:
        running_tags = set(running)
        with self._lock:
            for tag in held:
                if self._tags.get(tag) in (FORGET, RESTORE):
                    continue
                self._tags[tag] = RUNNING if tag in running_tags else RESTORE

    def note_failed(self, tag: str, requeue: bool | None) -> None:
        """An ack (requeue None), or a reject, failed on a closed channel."""
        with self._lock:
            self._tags[tag] = RESTORE if requeue else FORGET
        self.settle()

    def note_unrecorded(self, tag: str, payload: Any, exchange: str, routing_key: str) -> None:
        """A message taken from its queue (BRPOP) whose entry in `unacked` could not be written:
        Redis holds it nowhere now, so it is published again after the reconnect."""
        with self._lock:
            self._tags[tag] = REPUBLISH
            self._lost[tag] = (payload, exchange, routing_key)

    def connected(self, qos: Any) -> None:
        with self._lock:
            self._qos = qos
        self.settle()

    def disconnected(self) -> None:
        with self._lock:
            self._qos = None

    def pending(self) -> dict[str, str]:
        with self._lock:
            return dict(self._tags)

    def settle(self) -> tuple[int, int]:
        """Restore and forget what can be, on the live channel; returns (restored, forgotten)."""
        with self._lock:
            qos = self._qos
            todo = [(t, a) for t, a in self._tags.items() if a != RUNNING]
        if qos is None or not todo:
            return 0, 0
        restored = forgotten = 0
        for tag, action in todo:
            try:
                if action == RESTORE:
                    qos.restore_by_tag(tag, leftmost=True)
                    restored += 1
                elif action == REPUBLISH:
                    payload, exchange, routing_key = self._lost[tag]
                    with qos.channel.conn_or_acquire() as client:
                        pipe = client.pipeline()
                        qos.channel._do_restore_message(payload, exchange, routing_key, pipe, leftmost=True)
                        pipe.execute()
                    restored += 1
                else:
                    qos._remove_from_indices(tag).execute()
                    forgotten += 1
            except Exception as exc:
                log.warning("broker: could not %s message %s yet (%s); trying again later", action, tag, exc)
                break
            with self._lock:
                if self._tags.get(tag) == action:
                    del self._tags[tag]
                    self._lost.pop(tag, None)
        if restored or forgotten:
            log.log(
                logging.WARNING if restored else logging.INFO,
                "broker: handed back %d message(s) held across an outage, cleared %d late ack(s)",
                restored,
                forgotten,
            )
        return restored, forgotten


LEDGER = Ledger()


def held_tags(qos: Any) -> set[str]:
    """Tags a kombu QoS holds unacknowledged (acknowledged ones linger until its next flush)."""
    delivered = set(getattr(qos, "_delivered", {}) or {})
    return delivered - set(getattr(qos, "_dirty", ()) or ())


def running_tags() -> set[str]:
    from celery.worker import state

    tags = set()
    for request in tuple(state.active_requests):
        tag = getattr(getattr(request, "message", None), "delivery_tag", None)
        if tag is not None:
            tags.add(tag)
    return tags


def _qos_of(c: Any) -> Any:
    channel = getattr(getattr(c, "task_consumer", None), "channel", None)
    return getattr(channel, "qos", None)


class ResumeStep(bootsteps.StartStopStep):
    """Consumer bootstep: notes what the channel held when the consumer stops, settles the ledger
    when it has started again."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def include_if(self, c: Any) -> bool:
        """kombu's Redis transport only: RabbitMQ redelivers what a lost connection held."""
        return not is_amqp(str(c.app.conf.broker_url))

    def start(self, c: Any) -> None:
        LEDGER.reconnecting = False
        qos = _qos_of(c)
        if qos is not None and hasattr(qos, "restore_by_tag"):
            LEDGER.connected(qos)

    def stop(self, c: Any) -> None:
        LEDGER.reconnecting = True
        LEDGER.disconnected()
        qos = _qos_of(c)
        if qos is not None:
            LEDGER.note_held(held_tags(qos), running_tags())

    def shutdown(self, c: Any) -> None:
        # A worker that stops hands its messages back through kombu and workers/shutdown.py.
        LEDGER.reconnecting = False
        LEDGER.disconnected()
