"""The Celery configuration shared by producers (which only publish) and workers.

Kept in producers so both sides speak the same broker settings without producers
importing workers.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from kombu import Exchange, Queue

from producers.contract import QUEUE_API, QUEUE_CALLBACKS, QUEUE_TRANSFER, TASK_QUEUES
from producers.transport import adjust

# Above every step's worst case and every countdown: a message unacked for longer is
# redelivered to another worker. A 5000 MiB single PUT at 5 MB/s is ~17 min; countdowns
# are capped at MAX_COUNTDOWN_SECONDS.
VISIBILITY_TIMEOUT_SECONDS = 3 * 3600
MAX_COUNTDOWN_SECONDS = 600
# How long SIGTERM lets a worker's running steps finish before their messages go back to the
# queue (workers/shutdown.py); also Celery's worker_soft_shutdown_timeout, which only matters
# with REMAP_SIGTERM=SIGQUIT.
DEFAULT_SHUTDOWN_GRACE_SECONDS = 60.0


def shutdown_grace_seconds() -> float:
    """AWORK_SHUTDOWN_GRACE (seconds, default 60): the shutdown grace of a worker."""
    raw = os.environ.get("AWORK_SHUTDOWN_GRACE", "").strip()
    try:
        value = float(raw) if raw else DEFAULT_SHUTDOWN_GRACE_SECONDS
    except ValueError:
        raise ValueError(f"AWORK_SHUTDOWN_GRACE: expected seconds, got {raw!r}") from None
    return max(0.0, value)


# Broker sockets (workers and producers alike). No read or connect on a broker connection may
# wait for ever: a Redis that restarted, or a network that swallows packets (a black hole), must
# end in an error that Celery answers by reconnecting. socket_timeout stays well above kombu's
# BRPOP timeout (1 s), so an idle queue is never mistaken for a dead one.
BROKER_SOCKET_TIMEOUT_SECONDS = 10.0
BROKER_CONNECT_TIMEOUT_SECONDS = 5.0
BROKER_HEALTH_CHECK_SECONDS = 5
# TCP keepalive: a peer that went away without a word is found after ~10 + 3 x 5 s even on an
# idle connection.
KEEPALIVE_IDLE_SECONDS = 10
KEEPALIVE_INTERVAL_SECONDS = 5
KEEPALIVE_PROBES = 3


def keepalive_options() -> dict[int, int]:
    """TCP keepalive timings where the platform has them (Linux names them all)."""
    wanted = {
        "TCP_KEEPIDLE": KEEPALIVE_IDLE_SECONDS,
        "TCP_KEEPINTVL": KEEPALIVE_INTERVAL_SECONDS,
        "TCP_KEEPCNT": KEEPALIVE_PROBES,
    }
    return {getattr(socket, name): value for name, value in wanted.items() if hasattr(socket, name)}


def broker_transport_options() -> dict[str, Any]:
    """kombu Redis transport options: visibility timeout, socket bounds, keepalive, health checks.

    Why each bound (issue #12, a worker hung after a Redis restart):
    - socket_timeout: every reply kombu waits for, BRPOP's included, comes within it or the
      connection is dropped and re-made; the pub/sub reads use it too (workers/kombu_fixes.py);
    - socket_connect_timeout: a reconnect into a black hole fails instead of hanging;
    - socket_keepalive (+ options): the kernel finds a silent peer on idle connections;
    - health_check_interval: kombu PINGs the pub/sub connection and drops it after two missed
      answers, and drops a BRPOP whose reply is this much overdue;
    - retry_on_timeout: a publish or ack that times out once is tried again on a new connection.
    """
    return {
        "visibility_timeout": VISIBILITY_TIMEOUT_SECONDS,
        "retry_on_timeout": True,
        "socket_timeout": BROKER_SOCKET_TIMEOUT_SECONDS,
        "socket_connect_timeout": BROKER_CONNECT_TIMEOUT_SECONDS,
        "socket_keepalive": True,
        "socket_keepalive_options": keepalive_options(),
        "health_check_interval": BROKER_HEALTH_CHECK_SECONDS,
    }


def celery_config(redis_url: str) -> dict[str, Any]:
    """The Celery settings; BROKER_URL=amqp://, when set, moves the messages off `redis_url` to
    RabbitMQ (producers/transport.py says what changes there)."""
    from producers.redis_conn import broker_sentinel_options

    # a sentinel:// URL adds kombu's sentinel options (master_name, sentinel_kwargs)
    transport = {**broker_transport_options(), **broker_sentinel_options(redis_url)}
    return adjust(_redis_config(redis_url, transport), (QUEUE_API, QUEUE_TRANSFER, QUEUE_CALLBACKS))


def _redis_config(redis_url: str, transport: dict[str, Any]) -> dict[str, Any]:
    return {
        "broker_url": redis_url,
        "broker_transport_options": transport,
        "broker_connection_retry_on_startup": True,
        "result_backend": None,
        "task_ignore_result": True,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "event_serializer": "json",
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_default_queue": QUEUE_API,
        "task_queues": [
            Queue(QUEUE_API, Exchange(QUEUE_API), routing_key=QUEUE_API),
            Queue(QUEUE_TRANSFER, Exchange(QUEUE_TRANSFER), routing_key=QUEUE_TRANSFER),
            Queue(QUEUE_CALLBACKS, Exchange(QUEUE_CALLBACKS), routing_key=QUEUE_CALLBACKS),
        ],
        "task_routes": {name: {"queue": queue} for name, queue in TASK_QUEUES.items()},
        "task_send_sent_event": True,
        "worker_send_task_events": True,
        "task_track_started": True,
        "task_publish_retry": True,
        "task_publish_retry_policy": {
            "max_retries": 5,
            "interval_start": 0.2,
            "interval_step": 0.5,
            "interval_max": 2.0,
        },
        "broker_connection_max_retries": None,
        "worker_hijack_root_logger": False,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "worker_soft_shutdown_timeout": shutdown_grace_seconds(),
    }
