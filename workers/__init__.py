"""The worker side: the Celery app and the upload steps. Start with `celery -A workers worker`.

`workers.app` is resolved lazily, so importing a helper module (the rate limiter, the blob
transfer) does not build the Celery app. No module reads a setting at import: the worker reads
them once when it starts (workers.celery_app for the broker, workers.signals for the rest).
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "app":
        from workers.celery_app import app

        return app
    raise AttributeError(f"module 'workers' has no attribute {name!r}")
