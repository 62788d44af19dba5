"""The Celery app: `celery -A workers worker` finds it as `workers.app` (defined in workers.celery_app)."""

from __future__ import annotations

from celery import Celery

from producers.broker import celery_config
from producers.config import SharedSettings
from producers.transport import uses_redis_transport
from workers.liveness import LivenessStep
from workers.resume import ResumeStep

_redis_url = SharedSettings.from_env().redis_url
# kombu's Redis transport needs its guards (workers/kombu_fixes.py, workers/resume.py); RabbitMQ
# does not (producers/transport.py).
_REDIS_TRANSPORT = uses_redis_transport(_redis_url)
app = Celery(
    "workers",
    include=[
        *(["workers.kombu_fixes"] if _REDIS_TRANSPORT else []),
        "workers.steps",
        "workers.resolve",
        "workers.versions",
        "workers.by_url",
        "workers.callbacks",
        "workers.signals",
        "workers.connections.keepalive",
        "workers.shutdown",
        "workers.metrics",
        "workers.logging_setup",
    ],
)
app.conf.update(celery_config(_redis_url))
# Consumer bootsteps: hand back what was held across a broker reconnect; tick the liveness watchdog.
if _REDIS_TRANSPORT:
    app.steps["consumer"].add(ResumeStep)
app.steps["consumer"].add(LivenessStep)
