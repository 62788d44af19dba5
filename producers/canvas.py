"""Publishing the canvas by task name, so producers never import the workers' code."""

from __future__ import annotations

from typing import Any

from celery import Celery, chain
from celery.canvas import Signature

from producers.broker import celery_config
from producers.contract import (
    TASK_GENERATE_UPLOAD_URL,
    TASK_LINK_FILE,
    TASK_MULTIPART_UPLOAD,
    TASK_PUT_FILE,
    TASK_QUEUES,
)
from producers.priority import BROKER_PRIORITY, DEFAULT_PRIORITY, Priority


def publisher_app(redis_url: str) -> Celery:
    """A Celery app that only sends: same broker settings as the workers, no task code."""
    app = Celery("awork-uploads-producer", set_as_current=False)
    app.conf.update(celery_config(redis_url))
    return app


def message_options(name: str, priority: Priority = DEFAULT_PRIORITY) -> dict[str, Any]:
    """The one place that says where a step's message goes and how it is ranked there: its
    queue (by task name) and the kombu priority of the job's priority. Fairness across
    workspaces is not decided here but where work is taken (workers/fair_share.py)."""
    return {"queue": TASK_QUEUES[name], "priority": BROKER_PRIORITY[priority]}


def step(app: Celery, name: str, kwargs: dict[str, Any], priority: Priority = DEFAULT_PRIORITY) -> Signature:
    """An immutable signature: a step never receives the previous step's return value."""
    return app.signature(name, kwargs=kwargs, immutable=True, **message_options(name, priority))


def job_canvas(
    app: Celery, three_steps: bool, kwargs: dict[str, Any], priority: Priority = DEFAULT_PRIORITY
) -> Signature:
    """generate_upload_url -> put_file -> link_file, or the one multipart step.

    kwargs are what Flower shows: the job id and non-secret fields (workspace, target, file name).
    """
    if not three_steps:
        return step(app, TASK_MULTIPART_UPLOAD, kwargs, priority)
    return chain(
        step(app, TASK_GENERATE_UPLOAD_URL, kwargs, priority),
        step(app, TASK_PUT_FILE, kwargs, priority),
        step(app, TASK_LINK_FILE, kwargs, priority),
    )


def step_kwargs(job_id: str, workspace: str, target: str, file_name: str) -> dict[str, Any]:
    return {"job_id": job_id, "workspace": workspace, "target": target, "file_name": file_name}
