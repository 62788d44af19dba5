"""`awork.resolve_existing`: for `on_existing` version or skip, look at the entity's files first.

Under the name lock (workers.name_lock) it reads the entity's file list (paged, a rate token per
page) and then ends the job (`skip` with a file of the same name and size: done, outcome
`skipped`), or goes on as a new version of the newest file of that name, or as a new file (the
default canvas, or byurl). The decision is written to the record (`flow`) before the next task
is sent, so a re-drive (producers.redrive) starts where the decision led.
"""

from __future__ import annotations

import random
import time
from typing import Any

from producers.canvas import job_canvas, step_kwargs
from producers.contract import TASK_RESOLVE_EXISTING, JobState, Target
from producers.recurring import flow_canvas
from workers.celery_app import app
from workers.file_match import latest_size, newest_named, top_version
from workers.name_lock import NameLocks, name_key
from workers.step_context import StepContext
from workers.step_runner import run_step
from workers.steps import StepTask, finish_done

# A job waiting for another job that owns its file name looks again after this long (seconds,
# doubling per wait, with jitter).
NAME_WAIT_BASE_SECONDS = 1.0
NAME_WAIT_MAX_SECONDS = 15.0


def _resolved(record: dict[str, str]) -> bool:
    return record.get("flow") != "resolve"


def _wait_for_name(ctx: StepContext, owner: str) -> BaseException:
    waits = int(ctx.record.get("name_waits") or 0)
    ceiling = min(NAME_WAIT_MAX_SECONDS, NAME_WAIT_BASE_SECONDS * 2 ** min(waits, 8))
    countdown = random.uniform(ceiling / 2, ceiling)
    ctx.update(wait_reason="name_lock", wait_until=time.time() + countdown, name_waits=waits + 1,
               name_owner=owner)
    return ctx.task.retry(countdown=countdown, max_retries=None)


def _resolve(ctx: StepContext) -> dict[str, Any]:
    record = ctx.record
    target = Target.parse(record["target"])
    assert target.list_path is not None  # refused at enqueue (producers.recurring)
    owner = NameLocks(ctx.rt.redis).acquire(name_key(record), ctx.job_id)
    if owner is not None:
        raise _wait_for_name(ctx, owner)
    files = ctx.rt.client(ctx.workspace).list_files(target.list_path, before_each=ctx.take_token)
    match = newest_named(files, record["file_name"])
    mode = record.get("on_existing")
    if match is not None and mode == "skip":
        size = record.get("size")
        existing = latest_size(match)
        if size and existing == int(size):
            return finish_done(ctx, str(match["id"]), existing, "skipped")
    kwargs = step_kwargs(ctx.job_id, ctx.workspace, record["target"], record["file_name"])
    if match is not None and mode == "version":
        before = top_version(match.get("fileVersions") or [])
        ctx.update(flow="version", version_of=str(match["id"]), version_before=before)
        version_step = flow_canvas(ctx.task.app, "version", kwargs)
        assert version_step is not None, "the version flow has a first step"
        raise ctx.task.replace(version_step)
    flow = "byurl" if record.get("via") == "awork" else ""
    ctx.update(flow=flow)
    canvas = flow_canvas(ctx.task.app, flow, kwargs) or job_canvas(ctx.task.app, target.three_steps, kwargs)
    raise ctx.task.replace(canvas)


@app.task(bind=True, base=StepTask, name=TASK_RESOLVE_EXISTING)
def resolve_existing(self: StepTask, /, job_id: str, **meta: Any) -> dict[str, Any]:
    return run_step(self, job_id, "resolve", JobState.QUEUED, _resolved, _resolve)
