"""`awork.add_version`: a new version of a file, one multipart POST .../files/{fileId}/versions.

awork has no by-upload-id variant for versions, so the bytes go as one streamed multipart body
(up to 1 GB), like the multipart route. A version added twice is a duplicate, so the step
records the file's highest version number before its first send (`version_before`: from the
lookup, else from the version list); an attempt whose answer was lost (timeout, dropped
connection, a worker killed mid-request) first reads the version list and, when a version
above that number with our size is there, takes it as ours instead of sending again.
"""

from __future__ import annotations

from typing import Any

from producers.contract import TASK_ADD_VERSION, JobState, Target
from workers.celery_app import app
from workers.errors import TransientError
from workers.file_match import top_version
from workers.step_context import StepContext
from workers.step_runner import run_step
from workers.steps import StepTask, finish_done, has_file_id, send_multipart


def version_target(record: dict[str, str]) -> tuple[str, str]:
    """(the file's id, the path of its versions)."""
    target = Target.parse(record["target"])
    file_id = record.get("version_of") or record.get("new_version_of")
    if not file_id:
        raise TransientError("no file to add a version to in the record")
    return file_id, f"/{target.entity}/{target.entity_id}/files/{file_id}/versions"


def find_our_version(versions: list[dict[str, Any]], before: int, size: int | None) -> dict[str, Any] | None:
    """The first version above number `before` with our size (any size when ours is unknown)."""
    for v in sorted(versions, key=lambda v: float(v.get("version") or 0)):
        if float(v.get("version") or 0) <= before:
            continue
        if size is None or v.get("size") is None or int(v["size"]) == size:
            return v
    return None


def _list_versions(ctx: StepContext, path: str) -> list[dict[str, Any]]:
    return ctx.rt.client(ctx.workspace).list_files(path, before_each=ctx.take_token)


def _add_version(ctx: StepContext) -> dict[str, Any]:
    record = ctx.record
    file_id, path = version_target(record)
    size = int(record["size"]) if record.get("size") else None
    if not record.get("version_before"):
        ctx.update(version_before=top_version(_list_versions(ctx, path)))
    before = int(record["version_before"])
    if record.get("version_sent") == "1":
        # an earlier attempt's outcome is unknown: look before sending the bytes again
        found = find_our_version(_list_versions(ctx, path), before, size)
        if found is not None:
            ctx.rt.store.incr(ctx.job_id, "reconciled")
            return finish_done(ctx, file_id, _size(found), "version", version_id=found.get("id", ""))
    info = send_multipart(ctx, path, "version_sent")
    if not info.get("id"):
        raise TransientError("awork answered a version without an id")
    return finish_done(ctx, file_id, _size(info), "version", version_id=info["id"])


def _size(info: dict[str, Any]) -> int | None:
    return int(info["size"]) if info.get("size") is not None else None


@app.task(bind=True, base=StepTask, name=TASK_ADD_VERSION)
def add_version(self: StepTask, /, job_id: str, **meta: Any) -> dict[str, Any]:
    return run_step(self, job_id, "version", JobState.UPLOADING, has_file_id, _add_version)
