"""How a recurring-files step ends a job that is not a plain new file: a version or a skip."""

from __future__ import annotations

from typing import Any

from producers.contract import JobState
from producers.records import name_lock_key
from workers import metrics
from workers.name_lock import NameLocks
from workers.step_runner import StepContext, announce_end, cleanup_staging


def name_key(record: dict[str, str]) -> str:
    return name_lock_key(record["workspace"], record["target"], record["file_name"])


def finish(ctx: StepContext, file_id: str, outcome: str, size: int | None, **more: object) -> dict[str, Any]:
    """Done: `file_id` holds the bytes (a new version) or held them already (skipped)."""
    expected = ctx.record.get("size")
    verified = size is not None and expected not in (None, "") and int(expected) == size
    fields: dict[str, object] = {"file_id": file_id, "outcome": outcome, "size_verified": verified, **more}
    if expected and outcome != "skipped":
        fields["bytes_sent"] = expected
    ctx.rt.store.finish(ctx.job_id, JobState.DONE, notify=ctx.record.get("notify") == "1", **fields)
    metrics.job_finished(JobState.DONE.value, ctx.workspace)
    cleanup_staging(ctx)
    release_name(ctx)
    announce_end(ctx.task, ctx.rt, ctx.job_id, ctx.record)
    return {"file_id": file_id, "outcome": outcome}


def release_name(ctx: StepContext) -> None:
    if ctx.record.get("on_existing") in ("version", "skip"):
        NameLocks(ctx.rt.redis).release(name_key(ctx.record), ctx.job_id)
