"""The broker's gauges, read at scrape time (``QueueDepthCollector``).

``awork_uploads_queue_depth{queue}`` (messages waiting), ``awork_uploads_unacked_messages``
(delivered but not acknowledged: running steps and countdown retries held by workers),
``awork_uploads_dead_letters`` and ``awork_uploads_broker_up``. Every worker reports the same
broker-wide values: aggregate them with ``max``, not ``sum``.

Where they come from depends on the broker (producers/transport.py):

- kombu's Redis transport (no BROKER_URL): everything from Redis; the depth counts kombu's
  priority sub-queues too. ``BrokerLayout`` also tells the sweeper where kombu keeps the queues.
- RabbitMQ (BROKER_URL=amqp://...): the depth from a passive declare of each step queue
  (messages ready; quorum queues keep every priority in the one queue; a queue no worker has
  declared yet holds 0), on one connection kept across scrapes (``AmqpQueueDepths``);
  ``broker_up`` is whether RabbitMQ answered. No ``unacked_messages``: AMQP does not tell a
  client how many of a queue's messages are delivered and unacknowledged (only RabbitMQ's
  management API does). The dead letters are a Redis key and still come from Redis.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import redis
from amqp.exceptions import AMQPError
from kombu import Connection
from kombu.exceptions import KombuError
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from producers.redis_conn import redis_client
from producers.transport import is_amqp, queue_ready
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


# What a failed read of RabbitMQ raises: socket errors and timeouts (OSError), py-amqp's
# connection and channel errors, kombu's wrapped ones. A kept connection that failed with one of
# these (not a timeout) is worth one try on a fresh connection.
AMQP_ERRORS: tuple[type[BaseException], ...] = (OSError, AMQPError, KombuError)


class AmqpQueueDepths:
    """Messages ready in the step queues on RabbitMQ, one passive ``queue_declare`` each.

    A read never takes longer than ``timeout`` seconds, whatever the broker does:

    - The connection fails fast: ``timeout`` for the TCP connect and each step of the AMQP
      handshake, socket read and write timeouts of ``timeout`` for the declares, and one attempt
      (``ensure_connection(max_retries=0)``: kombu's ``Connection.connect()``/``channel()`` retry
      once after a 2 s sleep, which a plain ``app.connection_for_write()`` would do).
    - The read itself runs in a short-lived thread the scrape waits for at most ``timeout``
      (name resolution, which no socket timeout bounds, and a broker that stalls mid-frame).
      A read still running holds the lock: the next scrape waits for it until its own deadline
      and then reports the broker down, so at most one read is ever stuck.

    The connection (no heartbeats, so nothing to service between scrapes) is kept for the next
    scrape and dropped on any error. When a kept connection fails with a connection error (the
    broker restarted, or closed it) the read tries once more on a fresh one; a timeout is not
    tried again. The URL holds a password: it is never logged.
    """

    def __init__(self, url: str, queues: Sequence[str], timeout: float = 2.0) -> None:
        self.url = url
        self.queues = tuple(queues)
        self.timeout = timeout
        self._conn: Any = None  # a kombu Connection, or None
        self._busy = threading.Lock()

    def read(self) -> dict[str, int]:
        """Messages ready per queue; raises what the read raised (mostly AMQP_ERRORS), or
        TimeoutError when the broker did not answer within ``timeout``."""
        deadline = time.monotonic() + self.timeout
        if not self._busy.acquire(timeout=self.timeout):
            raise TimeoutError("an earlier read is still waiting for RabbitMQ")
        result: Future[dict[str, int]] = Future()

        def run() -> None:
            try:
                result.set_result(self._read_now())
            except BaseException as exc:
                result.set_exception(exc)
            finally:
                self._busy.release()

        try:
            threading.Thread(target=run, name="awork-metrics-amqp", daemon=True).start()
        except BaseException:
            self._busy.release()
            raise
        return result.result(timeout=max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        """Close the kept connection (politely when no read is running, else drop it)."""
        if self._busy.acquire(timeout=self.timeout):
            try:
                conn, self._conn = self._conn, None
                if conn is not None:
                    try:
                        conn.release()
                    except Exception:
                        conn.collect()
            finally:
                self._busy.release()
        else:
            self._drop()

    def _read_now(self) -> dict[str, int]:
        while True:
            reused = self._conn is not None
            conn = self._conn if reused else self._connect()
            try:
                return {queue: self._ready(conn, queue) for queue in self.queues}
            except BaseException as exc:
                self._drop()
                if not reused or isinstance(exc, TimeoutError) or not isinstance(exc, AMQP_ERRORS):
                    raise

    def _connect(self) -> Any:
        conn = Connection(
            self.url,
            connect_timeout=self.timeout,
            heartbeat=0,
            transport_options={
                "read_timeout": self.timeout,
                "write_timeout": self.timeout,
                "client_properties": {"connection_name": "awork-uploads queue metrics"},
            },
        )
        try:
            conn.ensure_connection(max_retries=0, reraise_as_library_errors=False)
        except BaseException:
            conn.collect()
            raise
        self._conn = conn
        return conn

    @staticmethod
    def _ready(conn: Any, queue: str) -> int:
        if not conn.connected:  # else kombu's conn.channel() reconnects with a retry and a 2 s sleep
            raise ConnectionError("the connection to RabbitMQ is closed")
        return queue_ready(conn, queue)

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.collect()  # closes the socket without the AMQP close handshake
            except Exception:
                pass


class QueueDepthCollector(Collector):
    """Reads the broker's gauges on every scrape: from Redis, or from RabbitMQ when `broker_url`
    is an amqp:// URL (the module's docstring says which gauge comes from where).

    A scrape never hangs on a sick broker (``timeout``, 2 s, for Redis's sockets and for the whole
    RabbitMQ read) and never fails: when the broker cannot be read, ``awork_uploads_broker_up`` is
    0 and the gauges read from it are left out.
    """

    def __init__(
        self,
        redis_url: str,
        layout: BrokerLayout | None = None,
        timeout: float = 2.0,
        broker_url: str | None = None,
    ) -> None:
        self.redis_url = redis_url
        self.layout = layout or BrokerLayout()
        self.timeout = timeout
        self.amqp = (
            AmqpQueueDepths(broker_url, self.layout.queues, timeout)
            if broker_url and is_amqp(broker_url)
            else None
        )
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
        """(depth per queue, unacked messages, dead letters), straight from Redis (kombu's Redis
        transport)."""
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

    def dead_letters(self) -> int:
        from producers.keys import DEAD_KEY

        return int(self._redis().zcard(DEAD_KEY))

    def collect(self) -> Iterable[Metric]:
        if self.amqp is not None:
            yield from self._collect_amqp(self.amqp)
            return
        try:
            depths, unacked, dead = self.read()
        except (redis.RedisError, OSError) as exc:
            log.warning("metrics: cannot read queue depth from Redis: %s", type(exc).__name__)
            yield _up_family(False)
            return
        yield _depth_family(depths, "all priority sub-queues, read from Redis")
        yield GaugeMetricFamily(
            f"{PREFIX}unacked_messages",
            "Messages delivered to workers and not yet acknowledged (running steps, countdown retries); "
            "Redis broker only.",
            value=unacked,
        )
        yield _dead_family(dead)
        yield _up_family(True)

    def _collect_amqp(self, amqp: AmqpQueueDepths) -> Iterable[Metric]:
        depths: dict[str, int] | None = None
        try:
            depths = amqp.read()
        except Exception as exc:  # whatever kombu raises, a scrape must not fail (nor log the URL)
            log.warning("metrics: cannot read queue depth from RabbitMQ: %s", type(exc).__name__)
        dead: int | None = None
        try:
            dead = self.dead_letters()
        except (redis.RedisError, OSError) as exc:
            log.warning("metrics: cannot read the dead letters from Redis: %s", type(exc).__name__)
        if depths is not None:
            yield _depth_family(depths, "messages ready, by a passive declare on RabbitMQ")
        if dead is not None:
            yield _dead_family(dead)
        yield _up_family(depths is not None)

    def close(self) -> None:
        """Close the RabbitMQ connection kept across scrapes (the Redis client's pool closes by
        itself)."""
        if self.amqp is not None:
            self.amqp.close()

    def describe(self) -> Iterable[Metric]:
        return []  # values come from the broker at scrape time; nothing to check at registration


def _depth_family(depths: Mapping[str, int], how: str) -> GaugeMetricFamily:
    depth = GaugeMetricFamily(
        f"{PREFIX}queue_depth", f"Messages waiting in a Celery queue ({how}).", labels=["queue"]
    )
    for queue, n in depths.items():
        depth.add_metric([queue], n)
    return depth


def _up_family(up: bool) -> GaugeMetricFamily:
    return GaugeMetricFamily(
        f"{PREFIX}broker_up", "1 when this scrape could read the broker, else 0.", value=int(up)
    )


def _dead_family(dead: int) -> GaugeMetricFamily:
    return GaugeMetricFamily(
        f"{PREFIX}dead_letters", "Failed and dead jobs in the dead-letter set.", value=dead
    )
