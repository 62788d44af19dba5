"""The upload steps. Task names are the stable strings in producers.contract.

Each body is safe to run twice: it looks at the job record first and skips work already done.
Only non-secret values go in and out: the upload URL stays in the job record.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from celery import Task

from producers.block_digests import BlockDigests, sidecar_path
from producers.contract import (
    QUEUE_API,
    TASK_GENERATE_UPLOAD_URL,
    TASK_LINK_FILE,
    TASK_MULTIPART_UPLOAD,
    TASK_PUT_FILE,
    TASK_QUEUES,
    JobState,
    Target,
)
from producers.job_ids import is_job_id
from producers.priority import RETRY_PRIORITY
from producers.safe_open import FileRefused, open_beneath
from producers.transport import message_priority
from workers import fair_gate, metrics
from workers.blob import plain_session, url_expiry
from workers.block_journal import RedisBlockJournal
from workers.celery_app import app
from workers.errors import PermanentError, TransientError, UploadUrlExpired
from workers.file_match import find_linked_file, latest_size
from workers.multipart import multipart_body
from workers.name_lock import release_job_name
from workers.sources import ByteSource, FileSource
from workers.step_context import StepContext
from workers.step_runner import JobEnded, announce_end, cleanup_staging, run_step
from workers.url_source import DEFAULT_MAX_SOURCE_BYTES, open_url_source

# awork's code for "this uploadId is linked already" (a second link of the same upload).
ALREADY_LINKED = "duplication-violation"

# A URL this close to its `se=` expiry is not worth starting a PUT with (at most a quarter of
# its lifetime, so short-lived URLs stay usable).
URL_EXPIRY_MARGIN_SECONDS = 30.0


def url_usable(record: dict[str, str], now: float | None = None) -> bool:
    """The job has an upload URL that is not at (or near) its `se=` expiry."""
    if not (record.get("upload_id") and record.get("upload_url")):
        return False
    expires = float(record.get("upload_url_expires") or 0)
    if not expires:
        return True
    issued = float(record.get("upload_url_issued_at") or 0) or expires
    margin = min(URL_EXPIRY_MARGIN_SECONDS, max(0.0, expires - issued) / 4)
    return expires > (now or time.time()) + margin


class StepTask(Task[Any, Any]):
    acks_late = True
    reject_on_worker_lost = True
    max_retries = None
    ignore_result = True
    throws = (JobEnded,)

    def retry(self, *args: Any, **options: Any) -> Any:
        """A deferred API step goes back to the queue at RETRY_PRIORITY (producers.priority
        says why); a transfer keeps its own."""
        if TASK_QUEUES.get(self.name) == QUEUE_API:
            options.setdefault("priority", message_priority(RETRY_PRIORITY))
        return super().retry(*args, **options)


def _target(record: dict[str, str]) -> Target:
    return Target.parse(record["target"])


# -- step 1 ----------------------------------------------------------------------------------
def _generate(ctx: StepContext) -> dict[str, Any]:
    ctx.take_token()
    issued = time.time()
    upload_id, upload_url = ctx.rt.client(ctx.workspace).generate_upload_url()
    expires = url_expiry(upload_url)
    ctx.finish_step(
        upload_id=upload_id,
        upload_url=upload_url,
        upload_url_issued_at=issued,
        upload_url_expires=expires.timestamp() if expires else "",
        uploaded_upload_id="",
        bytes_sent=0,
    )
    fair_gate.expect(ctx)  # the put's message follows: the fleet's shares count it from now
    return {"upload_id": upload_id}


@app.task(bind=True, base=StepTask, name=TASK_GENERATE_UPLOAD_URL)
def generate_upload_url(self: StepTask, /, job_id: str, **meta: Any) -> dict[str, Any]:
    return run_step(self, job_id, "generate", JobState.REQUESTING_URL, url_usable, _generate)


# -- step 2 ----------------------------------------------------------------------------------
def _put_done(record: dict[str, str]) -> bool:
    return bool(record.get("upload_id")) and record.get("uploaded_upload_id") == record.get("upload_id")


def _put(ctx: StepContext) -> dict[str, Any]:
    record = ctx.record
    url = record.get("upload_url")
    if not url or not url_usable(record):
        raise UploadUrlExpired("no upload URL, or it is at its se= expiry")
    source = _open_source(ctx)
    journal = RedisBlockJournal(ctx.rt.redis, ctx.job_id)
    try:
        outcome = ctx.rt.uploader.upload(
            url,
            source,
            content_type=record.get("content_type") or "application/octet-stream",
            journal=journal,
            progress=ctx.progress,
            fence=ctx.fence,
        )
    finally:
        _close(source)
    ctx.finish_step(
        uploaded_upload_id=record["upload_id"],
        size=outcome.size,
        md5=outcome.md5_b64,
        bytes_sent=outcome.size,
        bytes_total=outcome.size,
        put_mode=outcome.mode,
        # who computed the blocks' Content-MD5s: staging (the host checked the producer's
        # bytes end to end) or this worker
        put_block_md5s=("staging" if outcome.staged_block_md5s else "worker")
        if outcome.mode == "blocks"
        else "",
    )
    return {"upload_id": record["upload_id"], "size": outcome.size, "mode": outcome.mode}


@app.task(bind=True, base=StepTask, name=TASK_PUT_FILE)
def put_file(self: StepTask, /, job_id: str, **meta: Any) -> dict[str, Any]:
    return run_step(self, job_id, "put", JobState.UPLOADING, _put_done, _put)


# -- step 3 ----------------------------------------------------------------------------------
def has_file_id(record: dict[str, str]) -> bool:
    """The job holds awork's file id: the step that ends it is done."""
    return bool(record.get("file_id"))


def _link(ctx: StepContext) -> dict[str, Any]:
    record = ctx.record
    upload_id = record.get("upload_id", "")
    if not upload_id or record.get("uploaded_upload_id") != upload_id:
        # A link from an older chain, or the put's record write was lost: the put of the current
        # chain (or the sweeper) brings the job here again.
        raise TransientError("the upload has not finished yet")
    target = _target(record)
    # An earlier attempt sent this link and its outcome is unknown (timeout, dropped
    # connection, a worker killed mid-request): look before linking again.
    sent_before = record.get("link_sent_for") == upload_id
    if sent_before:
        found = reconcile(ctx, target)
        if found:
            return found
    ctx.take_token()
    if not sent_before:
        ctx.update(link_sent_for=upload_id, link_started_at=time.time())
    try:
        info = ctx.rt.client(ctx.workspace).link_upload(
            target.link_path, upload_id, record["file_name"], record.get("description") or None
        )
    except PermanentError as exc:
        if sent_before and exc.code == ALREADY_LINKED:
            # awork says this upload is linked already: our earlier attempt went through.
            return file_done(ctx, {}, evidence="already-linked")
        raise
    return file_done(ctx, info)


@app.task(bind=True, base=StepTask, name=TASK_LINK_FILE)
def link_file(self: StepTask, /, job_id: str, **meta: Any) -> dict[str, Any]:
    return run_step(self, job_id, "link", JobState.LINKING, has_file_id, _link)


# -- one-request route -----------------------------------------------------------------------
def _multipart(ctx: StepContext) -> dict[str, Any]:
    record = ctx.record
    target = _target(record)
    sent_before = record.get("multipart_sent") == "1"
    if sent_before:
        # Companies have no file list in awork's API: there a lost answer may mean a second
        # file when the request is sent again (README.md, "How it works").
        found = reconcile(ctx, target)
        if found:
            return found
    return file_done(ctx, send_multipart(ctx, target.link_path, "multipart_sent"))


@app.task(bind=True, base=StepTask, name=TASK_MULTIPART_UPLOAD)
def multipart_upload(self: StepTask, /, job_id: str, **meta: Any) -> dict[str, Any]:
    return run_step(self, job_id, "multipart", JobState.UPLOADING, has_file_id, _multipart)


# -- shared ----------------------------------------------------------------------------------
def send_multipart(ctx: StepContext, path: str, sent_field: str) -> dict[str, Any]:
    """One streamed multipart POST of the job's bytes to `path`, awork's answer. `sent_field`
    is set in the record before the first send: a later attempt knows the outcome of an earlier
    one may be unknown, and looks before sending again."""
    record = ctx.record
    source = _open_source(ctx)
    try:
        ctx.take_token()
        # checks the staged MD5 while streaming, aborting before the body's end on a mismatch
        body, content_type, length = multipart_body(
            source, record["file_name"], record.get("content_type") or "application/octet-stream"
        )
        if record.get(sent_field) != "1":
            ctx.update(**{sent_field: 1, "link_started_at": time.time()})
        return ctx.rt.client(ctx.workspace).multipart_upload(path, body, content_type, length)
    finally:
        _close(source)


def _open_source(ctx: StepContext) -> ByteSource:
    settings = ctx.rt.settings
    return open_source(
        ctx.record, settings.shared.source_url_hosts, settings.shared.staging_dir, settings.max_source_bytes
    )


def reconcile(ctx: StepContext, target: Target) -> dict[str, Any] | None:
    """After an attempt whose outcome is unknown: does awork already hold the file?"""
    if target.list_path is None:
        return None
    files = ctx.rt.client(ctx.workspace).list_files(target.list_path, before_each=ctx.take_token)
    info = find_linked_file(files, ctx.record)
    if info is None:
        return None
    ctx.rt.store.incr(ctx.job_id, "reconciled")
    return file_done(ctx, info)


def file_done(ctx: StepContext, info: dict[str, Any], evidence: str = "") -> dict[str, Any]:
    """Finish the job as done with awork's FileInfo. With `evidence`, awork confirmed the link
    without its FileInfo (a profile image has no file list to look it up in): the file id stays
    unknown."""
    file_id = str(info.get("id") or "")
    if not file_id and not evidence:
        raise TransientError("awork answered without a file id")
    if evidence:
        return finish_done(ctx, file_id, None, done_evidence=evidence)
    return finish_done(ctx, file_id, latest_size(info))


def finish_done(
    ctx: StepContext, file_id: str, size: int | None, outcome: str = "", **more: object
) -> dict[str, Any]:
    """The one way a step ends a job `done`: `file_id` holds the bytes (`size` as awork reports
    them, compared with ours), or held them already (`outcome` skipped); `outcome` version for
    a new version of it. Then its staging, its name lock and its callbacks."""
    expected = ctx.record.get("size")
    verified = size is not None and expected not in (None, "") and int(expected) == size
    fields: dict[str, object] = {"file_id": file_id, "size_verified": verified, **more}
    if outcome:
        fields["outcome"] = outcome
    if expected and outcome != "skipped":
        fields["bytes_sent"] = expected
    linked = ctx.step == "link"
    if linked:
        # Linked: the bytes and their block acks are of no more use, and a redelivered link
        # reconciles without them. Removed before the job is marked done, so a worker killed in
        # between leaves no done job with staged bytes behind. (A multipart or version job keeps
        # them until it is done: a redelivered step that cannot find its file sends them again.)
        cleanup_staging(ctx)
    # a link's block acks go in the transaction that marks the job done
    drop = [RedisBlockJournal(ctx.rt.redis, ctx.job_id).key] if linked else []
    ctx.finish_job(JobState.DONE, drop=drop, **fields)
    metrics.job_finished(JobState.DONE.value, ctx.workspace)
    if not linked:
        cleanup_staging(ctx)
    release_job_name(ctx.rt.redis, ctx.job_id, ctx.record)
    announce_end(ctx.task, ctx.rt, ctx.job_id, ctx.record)
    return {"file_id": file_id, "outcome": outcome} if outcome else {"file_id": file_id}


def open_source(
    record: dict[str, str],
    source_url_hosts: tuple[str, ...],
    staging_dir: Path,
    max_source_bytes: int = DEFAULT_MAX_SOURCE_BYTES,
) -> ByteSource:
    """The job's bytes: its staged file, or its URL re-checked against the allow-list here too
    (and read up to `max_source_bytes`, AWORK_MAX_SOURCE_BYTES)."""
    if record.get("source_kind") == "url":
        return open_url_source(record["source"], source_url_hosts, max_source_bytes, plain_session())
    path = Path(record["source"])
    try:
        # Opened once, beneath STAGING_DIR, no symlink followed, a regular file: a crafted record
        # or a file swapped after staging cannot make a worker read (and upload) anything else.
        opened = open_beneath(staging_dir, path)
    except FileRefused as exc:
        if exc.missing:
            raise PermanentError(f"staged file {path.name} is gone", code="staging-missing") from None
        raise PermanentError(f"source {path.name} {exc.reason}", code="source-refused") from None
    md5 = record.get("source_md5") or None
    digests = None
    job_id = record.get("id", "")
    if md5 is not None and record.get("staged_owned") == "1" and is_job_id(job_id):
        # beside the job's own staging folder, never a path taken from the record
        digests = BlockDigests.load(sidecar_path(staging_dir, job_id))
    return FileSource(path, md5_b64=md5, block_digests=digests, opened=opened)


def _close(source: ByteSource) -> None:
    if isinstance(source, FileSource):
        source.close()
