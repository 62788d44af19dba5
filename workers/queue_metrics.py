"""The broker's gauges, read from Redis at scrape time (``QueueDepthCollector``).

``awork_uploads_queue_depth{queue}`` (messages waiting, kombu's priority sub-queues included),
``awork_uploads_unacked_messages`` (delivered but not acknowledged: running steps and countdown
retries held by workers), ``awork_uploads_dead_letters`` and ``awork_uploads_broker_up``. Every
worker reports the same broker-wide values: aggregate them with ``max``, not ``sum``.
``BrokerLayout`` also tells the sweeper where kombu keeps the queues.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from producers.redis_conn import redis_client
from workers.metrics import PREFIX

log = logging.getLogger("awork.metrics")


@dataclass(frozen=True)
class BrokerLayout:
    """Where kombu's Redis transport keeps things (defaults of kombu.transport.redis.Channel)."""

    queues: tuple[str, ...] = ("awork.api", "awork.transfer")
    sep: str = "\x06\x16"
    priority_steps: tuple[int, ...] = (0, 3, 6, 9)
    global_keyprefix: str = ""
    unacked_key: str = "unacked"

    @classmethod
    def from_transport_options(
        cls, options: Mapping[str, Any], queues: Sequence[str] | None = None
    ) -> BrokerLayout:
        from kombu.transport.redis import Channel

        return cls(
            queues=tuple(queues) if queues else cls.queues,
            sep=str(options.get("sep", Channel.sep)),
            priority_steps=tuple(options.get("priority_steps", Channel.priority_steps)),
            global_keyprefix=str(options.get("global_keyprefix", "")),
            unacked_key=str(options.get("unacked_key", Channel.unacked_key)),
        )

    def list_keys(self, queue: str) -> list[str]:
        """The Redis lists holding `queue`'s messages: the plain name is priority 0, then
        `queue + sep + step` for every other priority step (e.g. 'awork.api\\x06\\x163')."""
        names = [queue] + [f"{queue}{self.sep}{step}" for step in self.priority_steps if step]
        return [f"{self.global_keyprefix}{name}" for name in names]


class QueueDepthCollector(Collector):
    """Reads queue lengths, unacked messages and dead letters from Redis on every scrape.

    A scrape never hangs on a sick Redis (2 s timeouts) and never fails: when Redis cannot be
    read, ``awork_uploads_broker_up`` is 0 and the depth gauges are left out.
    """

    def __init__(self, redis_url: str, layout: BrokerLayout | None = None, timeout: float = 2.0) -> None:
        self.redis_url = redis_url
        self.layout = layout or BrokerLayout()
        self.timeout = timeout
        self._client: redis.Redis | None = None
        self._lock = threading.Lock()

    def _redis(self) -> redis.Redis:
        with self._lock:
            if self._client is None:
                self._client = redis_client(
                    self.redis_url, socket_timeout=self.timeout, socket_connect_timeout=self.timeout
                )
            return self._client

    def read(self) -> tuple[dict[str, int], int, int]:
        """(depth per queue, unacked messages, dead letters), straight from Redis."""
        from producers.keys import DEAD_KEY

        layout = self.layout
        pipe = self._redis().pipeline(transaction=False)
        for queue in layout.queues:
            for key in layout.list_keys(queue):
                pipe.llen(key)
        pipe.hlen(f"{layout.global_keyprefix}{layout.unacked_key}")
        pipe.zcard(DEAD_KEY)
        replies = [int(r) for r in pipe.execute()]
        per_queue = len(layout.list_keys(layout.queues[0])) if layout.queues else 0
        depths = {
            queue: sum(replies[i * per_queue : (i + 1) * per_queue]) for i, queue in enumerate(layout.queues)
        }
        return depths, replies[-2], replies[-1]

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily(f"{PREFIX}broker_up", "1 when this scrape could read Redis, else 0.")
        try:
            depths, unacked, dead = self.read()
        except (redis.RedisError, OSError) as exc:
            log.warning("metrics: cannot read queue depth from Redis: %s", type(exc).__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        depth = GaugeMetricFamily(
            f"{PREFIX}queue_depth",
            "Messages waiting in a Celery queue (all priority sub-queues), read from Redis.",
            labels=["queue"],
        )
        for queue, n in depths.items():
            depth.add_metric([queue], n)
        yield depth
        yield GaugeMetricFamily(
            f"{PREFIX}unacked_messages",
            "Messages delivered to workers and not yet acknowledged (running steps, countdown retries).",
            value=unacked,
        )
        yield GaugeMetricFamily(
            f"{PREFIX}dead_letters", "Failed and dead jobs in the dead-letter set.", value=dead
        )
        yield up

    def describe(self) -> Iterable[Metric]:
        return []  # values come from Redis at scrape time; nothing to check at registration

