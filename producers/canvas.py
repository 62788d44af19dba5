"""Publishing the canvas by task name, so producers never import the workers' code."""

from __future__ import annotations

from typing import Any

from celery import Celery, chain
from celery.canvas import Signature

from producers.broker import celery_config
from producers.contract import (
    QUEUE_TRANSFER,
    TASK_GENERATE_UPLOAD_URL,
    TASK_LINK_FILE,
    TASK_MULTIPART_UPLOAD,
    TASK_PUT_FILE,
    TASK_QUEUES,
)
from producers.priority import BROKER_PRIORITY, DEFAULT_PRIORITY, TRANSFER_PRIORITY_OFFSET, Priority
from producers.transport import message_priority


def publisher_app(redis_url: str) -> Celery:
    """A Celery app that only sends: same broker settings as the workers, no task code."""
    app = Celery("awork-uploads-producer", set_as_current=False)
    app.conf.update(celery_config(redis_url))
    return app


def message_options(name: str, priority: Priority = DEFAULT_PRIORITY) -> dict[str, Any]:
    """The one place that says where a step's message goes and how it is ranked there: its
    queue (by task name) and a kombu priority from the job's priority, one step lower for a
    transfer. Kombu's Redis transport asks for every queue's priority-0 list first, then
    every queue's priority-3 list, and so on: a worker thread that comes free takes a short
    API step before a long transfer of the same job priority, so API steps (another
    workspace's generate, a link) never wait behind a fleet busy with transfers. Fairness
    across workspaces is decided where work is taken (workers/fair_share.py), not here."""
    queue = TASK_QUEUES[name]
    level = BROKER_PRIORITY[priority] + (TRANSFER_PRIORITY_OFFSET if queue == QUEUE_TRANSFER else 0)
    return {"queue": queue, "priority": message_priority(level)}


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
