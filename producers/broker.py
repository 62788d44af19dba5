"""The Celery configuration shared by producers (which only publish) and workers.

Kept in producers so both sides speak the same broker settings without producers
importing workers.
"""

from __future__ import annotations

from typing import Any

from kombu import Exchange, Queue

from producers.contract import QUEUE_API, QUEUE_TRANSFER, TASK_QUEUES

# Above every step's worst case and every countdown: a message unacked for longer is
# redelivered to another worker. A 5000 MiB single PUT at 5 MB/s is ~17 min; countdowns
# are capped at MAX_COUNTDOWN_SECONDS.
VISIBILITY_TIMEOUT_SECONDS = 3 * 3600
MAX_COUNTDOWN_SECONDS = 600


def celery_config(redis_url: str) -> dict[str, Any]:
    transport = {
        "visibility_timeout": VISIBILITY_TIMEOUT_SECONDS,
        # Reconnect instead of failing a publish when Redis blips.
        "retry_on_timeout": True,
        "socket_keepalive": True,
        "health_check_interval": 10,
    }
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
    }
