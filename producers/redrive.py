"""Re-publishing a job from the step it stopped at: for dead-letter retries and the sweeper.

Safe to do twice: every step skips work its job record says is done, so a re-drive that races
with a late redelivery of the original message costs a no-op, never a second file.
"""

from __future__ import annotations

from typing import Any

from celery import Celery, chain
from celery.canvas import Signature

from producers.canvas import step, step_kwargs
from producers.contract import STEP_TASKS, Route
from producers.priority import record_priority
from producers.recurring import first_step

THREE_STEPS = ("generate", "put", "link")


def resume_step(record: dict[str, str]) -> str:
    """The first step whose work the record does not show as done."""
    recurring = first_step(record)
    if recurring is not None:
        return recurring
    if record.get("route") == Route.MULTIPART.value:
        return "multipart"
    upload_id = record.get("upload_id")
    if upload_id and record.get("uploaded_upload_id") == upload_id:
        return "link"
    if upload_id and record.get("upload_url"):
        return "put"
    return "generate"


def canvas_from(app: Celery, record: dict[str, str], first: str) -> Signature:
    kwargs: dict[str, Any] = step_kwargs(
        record["id"], record["workspace"], record["target"], record["file_name"]
    )
    priority = record_priority(record)
    if first not in THREE_STEPS:  # multipart or a recurring flow's step: one task alone
        return step(app, STEP_TASKS[first], kwargs, priority)
    steps = THREE_STEPS[THREE_STEPS.index(first) :]
    sigs = [step(app, STEP_TASKS[s], kwargs, priority) for s in steps]
    return sigs[0] if len(sigs) == 1 else chain(*sigs)
