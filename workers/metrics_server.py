"""The HTTP endpoint that serves a worker's metrics (workers/metrics.py, workers/queue_metrics.py,
workers/fair_metrics.py), started by Celery's worker signals when the worker imports this module.

The endpoint (``start_metrics_server``):

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

The broker's gauges (workers/queue_metrics.py) come from the broker the worker consumes from:
kombu's lists in Redis, or RabbitMQ when ``BROKER_URL`` is an amqp:// URL.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, start_http_server

from workers.fair_metrics import FairShareCollector
from workers.queue_metrics import BrokerLayout, QueueDepthCollector

log = logging.getLogger("awork.metrics")

PORT_ENV = "WORKER_METRICS_PORT"
ADDR_ENV = "WORKER_METRICS_ADDR"
DEFAULT_ADDR = "0.0.0.0"
# How many consecutive ports a process tries, starting at WORKER_METRICS_PORT.
PORT_TRIES = 32


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
    redis_url: str,
    layout: BrokerLayout | None = None,
    registry: CollectorRegistry = REGISTRY,
    broker_url: str | None = None,
) -> QueueDepthCollector:
    """Add the queue-depth collector to `registry` once (later calls return the same one).

    `broker_url` is where the step messages are (None: BROKER_URL, else `redis_url`, as
    producers.transport.broker_url reads it); an amqp:// URL reads the queues on RabbitMQ."""
    from producers.transport import broker_url as configured_broker_url

    with _server_lock:
        existing = _collectors.get(id(registry))
        if existing is not None:
            return existing[1]
        if broker_url is None:
            broker_url = configured_broker_url(redis_url)
        collector = QueueDepthCollector(redis_url, layout, broker_url=broker_url)
        registry.register(collector)
        registry.register(FairShareCollector(redis_url))
        _collectors[id(registry)] = (registry, collector)
        return collector


def start_metrics_server(
    port_env: str = PORT_ENV,
    environ: Mapping[str, str] | None = None,
    registry: CollectorRegistry = REGISTRY,
    redis_url: str | None = None,
    layout: BrokerLayout | None = None,
    broker_url: str | None = None,
) -> int | None:
    """Serve this process's metrics when `port_env` is set; return the port (None when off).

    Once per process: a second call in the same process returns the port already bound.
    Never raises for a busy port range: the worker is more important than its metrics.
    `redis_url` (default REDIS_URL) and `broker_url` (default BROKER_URL, else Redis) are where the
    broker's gauges are read (``register_queue_collector``).
    """
    global _server
    env = os.environ if environ is None else environ
    port = parse_port(env.get(port_env))
    if port is None:
        return None
    addr = env.get(ADDR_ENV, "").strip() or DEFAULT_ADDR
    if redis_url is None:
        redis_url = _redis_url()
    if redis_url:
        register_queue_collector(redis_url, layout, registry, broker_url)
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
        collector.close()
    if server is not None and server.pid == os.getpid():
        server.stop()


def _redis_url() -> str | None:
    from producers.config import ConfigError, SharedSettings

    try:
        return SharedSettings.from_env().redis_url
    except ConfigError:
        return None


def _layout() -> BrokerLayout:
    from producers.broker import celery_config

    options = celery_config("redis://").get("broker_transport_options", {})
    return BrokerLayout.from_transport_options(options)


# -- Celery hooks: connected when the worker imports this module ----------------------------------
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
    "PORT_TRIES",
    "bind_first_free",
    "parse_port",
    "register_queue_collector",
    "start_metrics_server",
    "stop_metrics_server",
]
