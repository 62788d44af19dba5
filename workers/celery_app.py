"""The Celery app: `celery -A workers worker` finds it as `workers.app` (defined in workers.celery_app).

Importing this module reads no setting: the broker configuration is read from the environment
once, when Celery first needs it (a worker starting, a task being sent), so the step modules
and their helpers import anywhere, without a REDIS_URL.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from producers.broker import celery_config
from producers.config import SharedSettings
from workers.liveness import LivenessStep
from workers.resume import ResumeStep

TASK_MODULES = [
    "workers.kombu_fixes",
    "workers.steps",
    "workers.resolve",
    "workers.versions",
    "workers.by_url",
    "workers.callbacks",
    "workers.signals",
    "workers.connections.keepalive",
    "workers.shutdown",
    "workers.metrics_server",
    "workers.logging_setup",
]


def broker_config(shared: SharedSettings) -> dict[str, Any]:
    """The worker's Celery configuration for these settings (the same broker options as producers)."""
    return celery_config(shared.redis_url)


def _config_from_env() -> dict[str, Any]:
    """Read at worker start: a missing or malformed REDIS_URL stops it with a message naming it."""
    return broker_config(SharedSettings.from_env())


app = Celery("workers", include=TASK_MODULES)
app.add_defaults(_config_from_env)
# Consumer bootsteps: hand back what was held across a broker reconnect; tick the liveness watchdog.
app.steps["consumer"].add(ResumeStep)
app.steps["consumer"].add(LivenessStep)
