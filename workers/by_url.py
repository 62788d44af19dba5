"""`awork.fetch_by_url`: awork fetches a public URL itself (POST .../files/byurl, at most 100 MB).

No bytes pass through the workers. The source is checked again here (public, size by HEAD,
producers.public_source) since the enqueue check may be old and the worker's network differs.
An attempt whose answer was lost is reconciled like a link (workers.steps.reconcile: a file of
our name and size created since we sent) before the request is sent again.
"""

from __future__ import annotations

import time
from typing import Any

from producers.contract import TASK_FETCH_BY_URL, JobState, Target
from producers.public_source import SourceNotPublic, SourceUnreachable, public_source_size
from workers.celery_app import app
from workers.errors import PermanentError, TransientError
from workers.step_context import StepContext
from workers.step_runner import run_step
from workers.steps import StepTask, file_done, has_file_id, reconcile


def checked_size(ctx: StepContext, url: str) -> int:
    try:
        return public_source_size(url, ctx.rt.settings.shared.sandbox_test_mode)
    except SourceUnreachable as exc:
        raise TransientError(f"via awork: {exc}", code="source-unavailable") from None
    except SourceNotPublic as exc:
        raise PermanentError(f"via awork: {exc}", code="source-not-public") from None


def _fetch(ctx: StepContext) -> dict[str, Any]:
    record = ctx.record
    target = Target.parse(record["target"])
    sent_before = record.get("byurl_sent") == "1"
    if sent_before:
        found = reconcile(ctx, target)
        if found:
            return found
    size = checked_size(ctx, record["source"])
    ctx.take_token()
    if not sent_before:
        ctx.update(byurl_sent=1, link_started_at=time.time(), size=size)
    info = ctx.rt.client(ctx.workspace).add_file_by_url(
        f"/{target.entity}/{target.entity_id}/files/byurl",
        record["source"],
        record["file_name"],
        record.get("description") or None,
    )
    return file_done(ctx, info)


@app.task(bind=True, base=StepTask, name=TASK_FETCH_BY_URL)
def fetch_by_url(self: StepTask, /, job_id: str, **meta: Any) -> dict[str, Any]:
    return run_step(self, job_id, "byurl", JobState.UPLOADING, has_file_id, _fetch)
