"""Prometheus gauges of the fair share (workers/fair_share.py), read from Redis at scrape time.

- ``awork_uploads_fair_waiting{workspace}``: transfers waiting for a slot, plus those on their
  way (a generate step just finished);
- ``awork_uploads_fair_in_flight{workspace}``: transfers running or dispatched into a slot;
- ``awork_uploads_fair_share_slots{workspace}``: the slots its share allows now;
- ``awork_uploads_fair_capacity``: the transfer slots of the live workers.

Only active workspaces (with a transfer waiting, coming or in flight) are listed. Like the queue
depth, every worker reports the same fleet-wide values: aggregate with ``max``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable

import redis
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from producers.redis_conn import redis_client
from workers import step_lock
from workers.fair_share import FairShare
from workers.metrics import PREFIX

log = logging.getLogger("awork.metrics")


class FairShareCollector(Collector):
    def __init__(self, redis_url: str, timeout: float = 2.0) -> None:
        self.redis_url = redis_url
        self.timeout = timeout
        self._fair: FairShare | None = None
        self._lock = threading.Lock()

    def _share(self) -> FairShare:
        with self._lock:
            if self._fair is None:
                client = redis_client(
                    self.redis_url, socket_timeout=self.timeout, socket_connect_timeout=self.timeout
                )
                # a snapshot renews the leases whose step lock lives: by the lock's TTL, as a step does
                self._fair = FairShare(client, lease_seconds=step_lock.LOCK_TTL_SECONDS)
            return self._fair

    def collect(self) -> Iterable[Metric]:
        try:
            rows = self._share().snapshot()
        except (redis.RedisError, OSError) as exc:
            log.warning("metrics: cannot read the fair share from Redis: %s", type(exc).__name__)
            return
        waiting = GaugeMetricFamily(
            f"{PREFIX}fair_waiting", "Transfers waiting for a slot (or on their way).", labels=["workspace"]
        )
        in_flight = GaugeMetricFamily(
            f"{PREFIX}fair_in_flight", "Transfers running or dispatched into a slot.", labels=["workspace"]
        )
        slots = GaugeMetricFamily(
            f"{PREFIX}fair_share_slots",
            "Transfer slots the workspace's fair share allows now.",
            labels=["workspace"],
        )
        capacity = 0
        for r in rows:
            waiting.add_metric([r.workspace], r.waiting + r.expected)
            in_flight.add_metric([r.workspace], r.in_flight)
            slots.add_metric([r.workspace], r.slots)
            capacity = r.capacity
        yield waiting
        yield in_flight
        yield slots
        if rows:
            yield GaugeMetricFamily(
                f"{PREFIX}fair_capacity", "Transfer slots of the live workers.", value=capacity
            )

    def describe(self) -> Iterable[Metric]:
        return []
