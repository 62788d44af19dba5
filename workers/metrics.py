"""Prometheus metrics of a worker: a tiny typed API for the step runner, and the HTTP endpoint.

Every name starts with ``awork_uploads_``. What the step runner reports:

- ``step_finished(step, workspace, outcome, seconds)`` after every step run, whatever its outcome
  (``ok``, ``skipped``, ``deferred``, ``rate_limited``, ``retry``, ``url_expired``, ``failed``,
  ``dead``): ``awork_uploads_steps_total`` and ``awork_uploads_step_duration_seconds``.
- ``job_finished(state, workspace)`` when a job reaches ``done``, ``failed`` or ``dead``:
  ``awork_uploads_jobs_finished_total``.
- ``retry(step, reason)`` for every retry scheduled after a transient error (``retry_reason(exc)``
  maps an exception to a small fixed vocabulary): ``awork_uploads_retries_total``.
- ``rate_limited(workspace)`` for every 429 from awork: ``awork_uploads_rate_limited_total``.
- ``rate_wait(workspace, seconds)`` whenever a step is deferred for a rate token or a 429 pause:
  ``awork_uploads_rate_wait_seconds`` (a histogram: count = deferrals, sum = seconds).
- ``bytes_uploaded(workspace, n)`` as bytes reach the upload host: ``awork_uploads_bytes_uploaded_total``.

Read from Redis at scrape time (``QueueDepthCollector``): ``awork_uploads_queue_depth{queue}``
(messages waiting, kombu's priority sub-queues included), ``awork_uploads_unacked_messages``
(delivered but not acknowledged: running steps and countdown retries held by workers),
``awork_uploads_dead_letters`` and ``awork_uploads_broker_up``; the fair share's gauges per
workspace (workers/fair_metrics.py). Every worker reports the same
broker-wide values: aggregate them with ``max``, not ``sum``.

Of the worker itself, read at scrape time: ``awork_uploads_consumer_loop_tick_age_seconds``
(workers/liveness.py: seconds since the consumer loop last ticked; the watchdog ends the worker
above ``AWORK_LIVENESS_SECONDS``).

The endpoint (``start_metrics_server``), started by Celery's worker signals:

- Off unless ``WORKER_METRICS_PORT`` is set. ``WORKER_METRICS_ADDR`` is the address to bind
  (default ``0.0.0.0``: Prometheus scrapes from elsewhere; the metrics hold no secrets).
- Port policy: one endpoint per process that runs tasks. It binds ``WORKER_METRICS_PORT``; when
  that port is taken (another worker on the same machine) it tries the next one, up to
  ``PORT_TRIES`` ports, and logs the one it got. Several workers on one machine therefore serve
  on P, P+1, P+2, ...: scrape that range. ``0`` picks any free port (logged). When no port in the
  range is free the worker runs on without metrics and logs a warning.
- Pools: with ``threads`` (our default), ``solo``, ``gevent`` or ``eventlet`` the worker process
  serves once it is ready (``worker_ready``). With ``prefork`` each child process serves its own
  counters on its own port (``worker_process_init``); the parent, which runs no tasks, does not.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from producers.redis_conn import redis_client

log = logging.getLogger("awork.metrics")


def _tick_age() -> float:
    from workers.liveness import tick_age

    return tick_age()


PREFIX = "awork_uploads_"
PORT_ENV = "WORKER_METRICS_PORT"
ADDR_ENV = "WORKER_METRICS_ADDR"
DEFAULT_ADDR = "0.0.0.0"
# How many consecutive ports a process tries, starting at WORKER_METRICS_PORT.
PORT_TRIES = 32

# Steps last from milliseconds (a link) to many minutes (a multi-GB PUT).
STEP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
WAIT_BUCKETS = (0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

# The retry reasons `retry_reason` produces: a closed set keeps the label's cardinality small.
RETRY_REASONS = (
    "http_429",
    "http_5xx",
    "http_4xx",
    "timeout",
    "connection",
    "url_expired",
    "other",
)

JOBS_FINISHED = Counter(
    f"{PREFIX}jobs_finished",
    "Jobs that reached a final state (done, failed, dead).",
    ["state", "workspace"],
)
STEPS = Counter(
    f"{PREFIX}steps",
    "Step runs by outcome (ok, skipped, deferred, rate_limited, retry, url_expired, failed, dead).",
    ["step", "workspace", "outcome"],
)
STEP_DURATION = Histogram(
    f"{PREFIX}step_duration_seconds",
    "Wall time of one step run, by step and outcome.",
    ["step", "outcome"],
    buckets=STEP_BUCKETS,
)
RETRIES = Counter(
    f"{PREFIX}retries",
    "Retries scheduled after a transient error, by step and reason.",
    ["step", "reason"],
)
RATE_LIMITED = Counter(
    f"{PREFIX}rate_limited",
    "HTTP 429 responses from awork, per workspace.",
    ["workspace"],
)
RATE_WAIT = Histogram(
    f"{PREFIX}rate_wait_seconds",
    "Deferrals for a rate token or a 429 pause, per workspace (count = deferrals, sum = seconds).",
    ["workspace"],
    buckets=WAIT_BUCKETS,
)
# Set at scrape time from workers.liveness (the watchdog ends the worker above its limit).
LOOP_TICK_AGE = Gauge(
    f"{PREFIX}consumer_loop_tick_age_seconds",
    "Seconds since this worker's consumer loop last ticked (liveness; small when healthy).",
)
LOOP_TICK_AGE.set_function(_tick_age)
BYTES_UPLOADED = Counter(
    f"{PREFIX}bytes_uploaded",
    "Bytes accepted by the upload host (or sent in a multipart upload), per workspace.",
    ["workspace"],
)

# Metric family names (as exposed, without the _total/_bucket suffixes), for tests and dashboards.
FAMILIES = (
    f"{PREFIX}jobs_finished",
    f"{PREFIX}steps",
    f"{PREFIX}step_duration_seconds",
    f"{PREFIX}retries",
    f"{PREFIX}rate_limited",
    f"{PREFIX}rate_wait_seconds",
    f"{PREFIX}bytes_uploaded",
    f"{PREFIX}queue_depth",
    f"{PREFIX}unacked_messages",
    f"{PREFIX}dead_letters",
    f"{PREFIX}broker_up",
    f"{PREFIX}consumer_loop_tick_age_seconds",
)


# -- the API the step runner calls ----------------------------------------------------------------
def step_finished(step: str, workspace: str, outcome: str, seconds: float) -> None:
    """One step run ended with `outcome` after `seconds` of wall time."""
    STEPS.labels(step=step, workspace=workspace, outcome=outcome).inc()
    STEP_DURATION.labels(step=step, outcome=outcome).observe(max(0.0, seconds))


def job_finished(state: str, workspace: str) -> None:
    """A job reached its final state (`done`, `failed` or `dead`; a JobState works too)."""
    JOBS_FINISHED.labels(state=str(state), workspace=workspace).inc()


def retry(step: str, reason: str) -> None:
    """A retry was scheduled after a transient error; `reason` from `retry_reason(exc)`."""
    RETRIES.labels(step=step, reason=reason).inc()


def rate_limited(workspace: str) -> None:
    """awork answered 429 for this workspace."""
    RATE_LIMITED.labels(workspace=workspace).inc()


def rate_wait(workspace: str, seconds: float) -> None:
    """A step of this workspace was deferred `seconds` for a rate token or a 429 pause."""
    RATE_WAIT.labels(workspace=workspace).observe(max(0.0, seconds))


def bytes_uploaded(workspace: str, n: int) -> None:
    """`n` more bytes reached the upload host for this workspace (call with increments)."""
    if n > 0:
        BYTES_UPLOADED.labels(workspace=workspace).inc(n)


def retry_reason(exc: BaseException) -> str:
    """Map an error to one of RETRY_REASONS."""
    from workers.errors import AworkError, RateLimited, UploadUrlExpired

    if isinstance(exc, RateLimited):
        return "http_429"
    if isinstance(exc, UploadUrlExpired):
        return "url_expired"
    status = exc.status if isinstance(exc, AworkError) else None
    if status == 429:
        return "http_429"
    if status is not None and 500 <= status < 600:
        return "http_5xx"
    if status is not None and 400 <= status < 500:
        return "http_4xx"
    text = f"{type(exc).__name__} {exc}".lower()
    if "timeout" in text or "timed out" in text:
        return "timeout"
    if isinstance(exc, OSError) or "connection" in text:
        return "connection"
    return "other"


# -- queue depth, read from Redis at scrape time --------------------------------------------------
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
        from producers.records import DEAD_KEY

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


# -- the HTTP endpoint ----------------------------------------------------------------------------
@dataclass
class MetricsServer:
    port: int
    addr: str
    server: Any
    thread: threading.Thread
    pid: int

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


_server: MetricsServer | None = None
_collectors: dict[int, tuple[CollectorRegistry, QueueDepthCollector]] = {}
_server_lock = threading.Lock()


def parse_port(raw: str | None) -> int | None:
    """WORKER_METRICS_PORT: None when unset or blank (metrics off), else a port number."""
    from producers.config import ConfigError

    raw = (raw or "").strip()
    if not raw:
        return None
    try:
        port = int(raw)
    except ValueError:
        raise ConfigError(f"{PORT_ENV}: expected a port number, got {raw!r}") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"{PORT_ENV}: expected a port number 0-65535, got {port}")
    return port


def bind_first_free(
    port: int, addr: str, registry: CollectorRegistry, tries: int | None = None
) -> tuple[int, Any, threading.Thread]:
    """Serve `registry` on the first free port of port..port+tries-1 (any free port for 0)."""
    tries = PORT_TRIES if tries is None else tries
    last: OSError | None = None
    candidates = [0] if port == 0 else range(port, min(port + tries, 65536))
    for candidate in candidates:
        try:
            server, thread = start_http_server(candidate, addr=addr, registry=registry)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            last = exc
            continue
        return int(server.server_address[1]), server, thread
    raise OSError(errno.EADDRINUSE, f"ports {port}-{port + tries - 1} are all in use") from last


def register_queue_collector(
    redis_url: str, layout: BrokerLayout | None = None, registry: CollectorRegistry = REGISTRY
) -> QueueDepthCollector:
    """Add the queue-depth collector to `registry` once (later calls return the same one)."""
    with _server_lock:
        existing = _collectors.get(id(registry))
        if existing is not None:
            return existing[1]
        collector = QueueDepthCollector(redis_url, layout)
        registry.register(collector)
        from workers.fair_metrics import FairShareCollector  # imports this module: not at the top

        registry.register(FairShareCollector(redis_url))
        _collectors[id(registry)] = (registry, collector)
        return collector


def start_metrics_server(
    port_env: str = PORT_ENV,
    environ: Mapping[str, str] | None = None,
    registry: CollectorRegistry = REGISTRY,
    redis_url: str | None = None,
    layout: BrokerLayout | None = None,
) -> int | None:
    """Serve this process's metrics when `port_env` is set; return the port (None when off).

    Once per process: a second call in the same process returns the port already bound.
    Never raises for a busy port range: the worker is more important than its metrics.
    """
    global _server
    env = os.environ if environ is None else environ
    port = parse_port(env.get(port_env))
    if port is None:
        return None
    addr = env.get(ADDR_ENV, "").strip() or DEFAULT_ADDR
    if redis_url is None:
        redis_url = _broker_url()
    if redis_url:
        register_queue_collector(redis_url, layout, registry)
    with _server_lock:
        if _server is not None and _server.pid == os.getpid():
            return _server.port
        try:
            bound, server, thread = bind_first_free(port, addr, registry)
        except OSError as exc:
            log.warning("metrics: not serving (%s=%s on %s): %s", port_env, port, addr, exc)
            return None
        _server = MetricsServer(bound, addr, server, thread, os.getpid())
    log.info("metrics: serving http://%s:%d/metrics (pid %d)", addr, bound, os.getpid())
    return bound


def stop_metrics_server() -> None:
    """Stop this process's endpoint and drop the queue collectors (tests; a worker's endpoint
    simply dies with it)."""
    global _server
    with _server_lock:
        server, _server = _server, None
        collectors = list(_collectors.values())
        _collectors.clear()
    for registry, collector in collectors:
        registry.unregister(collector)
    if server is not None and server.pid == os.getpid():
        server.stop()


def _broker_url() -> str | None:
    from producers.config import ConfigError, SharedSettings

    try:
        return SharedSettings.from_env().redis_url
    except ConfigError:
        return None


def _layout() -> BrokerLayout:
    from producers.broker import celery_config

    options = celery_config("redis://").get("broker_transport_options", {})
    return BrokerLayout.from_transport_options(options)


# -- Celery hooks: connected when this module is imported by the worker ---------------------------
def _on_worker_process_init(**_: Any) -> None:
    """A prefork child (or the solo pool's own process): serve this process's counters."""
    _start_safely()


def _on_worker_ready(sender: Any = None, **_: Any) -> None:
    """The worker process itself serves, unless its tasks run in prefork children."""
    pool = getattr(sender, "pool", None)
    if pool is not None and type(pool).__module__ == "celery.concurrency.prefork":
        return
    _start_safely()


def _start_safely() -> None:
    try:
        start_metrics_server(layout=_layout())
    except Exception as exc:  # a bad setting must not stop the worker; say so loudly
        log.error("metrics: not serving: %s", exc)


def connect_signals() -> None:
    from celery.signals import worker_process_init, worker_ready

    worker_process_init.connect(_on_worker_process_init, weak=False, dispatch_uid="awork-metrics-init")
    worker_ready.connect(_on_worker_ready, weak=False, dispatch_uid="awork-metrics-ready")


connect_signals()

__all__ = [
    "FAMILIES",
    "PORT_TRIES",
    "RETRY_REASONS",
    "BrokerLayout",
    "QueueDepthCollector",
    "bytes_uploaded",
    "job_finished",
    "rate_limited",
    "rate_wait",
    "retry",
    "retry_reason",
    "start_metrics_server",
    "step_finished",
    "stop_metrics_server",
]
