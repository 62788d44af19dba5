"""The Celery app: `celery -A workers worker` finds it as `workers.app` (defined in workers.celery_app)."""

from __future__ import annotations

from celery import Celery

from producers.broker import celery_config
from producers.config import SharedSettings
from workers.liveness import LivenessStep
from workers.resume import ResumeStep

app = Celery(
    "workers",
    include=[
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
    ],
)
app.conf.update(celery_config(SharedSettings.from_env().redis_url))
# Consumer bootsteps: hand back what was held across a broker reconnect; tick the liveness watchdog.
app.steps["consumer"].add(ResumeStep)
app.steps["consumer"].add(LivenessStep)
