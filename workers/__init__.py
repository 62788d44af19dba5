"""The worker side: the Celery app and the upload steps. Start with `celery -A workers worker`."""

from workers.app import app

__all__ = ["app"]
