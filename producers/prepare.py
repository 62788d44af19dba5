"""A validated spec made ready to enqueue: its bytes staged (or its URL, or the file the intake
streamed, taken as they are) and its job record built, before anything is written to Redis."""

from __future__ import annotations

import time
from dataclasses import dataclass

from producers import staging
from producers.config import SharedSettings
from producers.contract import JobState, SpecError
from producers.job_ids import new_job_id
from producers.spec import ValidSpec


@dataclass(frozen=True)
class Prepared:
    job_id: str
    spec: ValidSpec
    record: dict[str, str]


@dataclass(frozen=True)
class _Source:
    """Where the workers read the job's bytes, and what is known of them."""

    kind: str  # "url" or "file"
    where: str
    owned: bool  # a staged copy of ours, removed when the job ends
    md5: str | None
    size: int | None


def prepare(
    v: ValidSpec, settings: SharedSettings, signer: str | None = None, batch_id: str | None = None
) -> Prepared:
    """Stage `v`'s bytes and build its record (`signer` signs its callbacks, `batch_id` places it
    in a batch); nothing is written to Redis yet."""
    job_id = v.streamed.job_id if v.streamed is not None else new_job_id()
    source = _source(v, settings, job_id)
    return Prepared(job_id, v, _record(v, job_id, source, signer, batch_id))


def discard_staging(settings: SharedSettings, p: Prepared) -> None:
    """Remove the job's staged copy, when it has one of its own."""
    if p.record.get("staged_owned") == "1":
        staging.remove_job_dir(settings.staging_dir, p.job_id)


def _source(v: ValidSpec, settings: SharedSettings, job_id: str) -> _Source:
    if v.url is not None:
        return _Source("url", v.url, False, None, v.size)
    if v.streamed is not None:
        return _Source("file", str(v.streamed.path), True, v.streamed.md5_b64, v.size)
    mode = settings.staging_mode
    if v.data is not None:
        staged = staging.stage_bytes(v.data, settings.staging_dir, job_id, v.file_name, mode)
    else:
        assert v.path is not None
        staged = staging.stage_file(
            v.path,
            settings.staging_dir,
            job_id,
            v.file_name,
            settings.single_put_threshold,
            settings.block_size,
            mode,
        )
    size = staged.size  # what staging saw on the descriptor it read (may differ from validate's)
    if size > v.target.max_bytes:
        if staged.owned:
            staging.remove_job_dir(settings.staging_dir, job_id)
        raise SpecError("path", f"grew to {size} bytes, over the {v.target.max_bytes} byte cap")
    return _Source("file", str(staged.path), staged.owned, staged.md5_b64, size)


def _record(
    v: ValidSpec, job_id: str, source: _Source, signer: str | None, batch_id: str | None
) -> dict[str, str]:
    now = repr(time.time())
    record = {
        "id": job_id,
        "state": JobState.QUEUED.value,
        "workspace": v.workspace,
        "target": str(v.target),
        "target_kind": v.target.kind,
        "entity": v.target.entity,
        "entity_id": v.target.entity_id,
        "route": v.target.route.value,
        "file_name": v.file_name,
        "description": v.description or "",
        "content_type": v.content_type,
        "size": "" if source.size is None else str(source.size),
        "source_kind": source.kind,
        "source": source.where,
        "staged_owned": "1" if source.owned else "0",
        "source_md5": source.md5 or "",
        "idempotency_key": v.idempotency_key or "",
        "priority": v.priority.value,
        "bytes_sent": "0",
        "published": "0",
        "created_at": now,
        "updated_at": now,
        **v.placement.record_fields(),
    }
    notify = False
    if v.callback_url or v.on_done:
        record.update(callback_url=v.callback_url or "", on_done=v.on_done or "", signer=signer or "")
        notify = True
    if batch_id:
        record["batch_id"] = batch_id
        notify = True
    if notify:  # its end is announced (producers.endings)
        record["notify"] = "1"
    return record
