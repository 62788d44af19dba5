"""The Celery app: `celery -A workers worker` finds it as `workers.app` (defined in workers.celery_app)."""

from __future__ import annotations

from celery import Celery

from producers.broker import celery_config
from producers.config import SharedSettings
from workers.resume import ResumeStep

app = Celery(
    "workers",
    include=[
        "workers.kombu_fixes",
        "workers.steps",
        "workers.signals",
        "workers.shutdown",
        "workers.metrics",
        "workers.logging_setup",
    ],
)
app.conf.update(celery_config(SharedSettings.from_env().redis_url))
# Consumer bootstep: hand back what was held across a broker reconnect (workers/resume.py).
app.steps["consumer"].add(ResumeStep)
