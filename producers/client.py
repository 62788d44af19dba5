"""The Python API other applications use: `Uploads.from_env().enqueue(path, to="task:<id>")`.

Order of writes, and why it is safe: the job record is written first (state `queued`,
`published=0`), then the canvas is published, then `published=1`.

- Publishing fails (Redis unreachable for the whole publish retry policy, ~6 s): the records and
  staged copies of the jobs not yet published are removed (retrying for `redis_retry_seconds`)
  before the error reaches the caller, so nothing half-done is left. `PublishFailed` names the
  jobs of the batch that did go out. Should Redis stay unreachable for the removal too, those
  records remain with `published=0` and the error says so (`pending_ids`): the workers' sweeper
  publishes them once Redis is back, so the caller must not enqueue them again.
- The producer dies between the two writes: a record with `published=0` remains and no message;
  the workers' sweeper publishes such records after a minute (steps are idempotent, so a
  message that did go out before the death only costs a no-op), so a record never stays without
  its message.
- A message without a record cannot happen, because no message is sent before its record
  exists (and a worker that meets a message whose record has expired drops it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

import redis
from kombu.exceptions import OperationalError

from producers import staging
from producers.batches import MAX_BATCH_JOBS, BatchPage, BatchStore, check_batch_id
from producers.callback_url import check_callback_url
from producers.cancel import CancelRefused, cancel_script
from producers.canvas import job_canvas, publisher_app, step_kwargs
from producers.config import (
    DEFAULT_WORKSPACE,
    ConfigError,
    SharedSettings,
    read_workspaces_file,
    redact_url,
)
from producers.connections import CONNECTIONS_KEY, ConnectionRegistry
from producers.contract import JobState, SpecError
from producers.endings import announce
from producers.job_ids import check_job_id, is_job_id, new_job_id
from producers.messages import Rendered, Templates, fast_path_supported, publish_rendered
from producers.public_source import by_url_checked
from producers.records import Job, JobStore, job_key
from producers.recurring import flow_canvas
from producers.redis_conn import redis_client
from producers.spec import JobSpec, ValidSpec, check_idempotency_key, validate

log = logging.getLogger("awork.producer")

WORKSPACES_KEY = "awork:workspaces"  # set: workspace names the running workers know
T = TypeVar("T")


class RedisUnavailable(ConnectionError):
    """Redis could not be reached within the retry window; the message names the URL."""


class PublishFailed(RedisUnavailable):
    """Publishing a batch failed part-way.

    `published_ids`: jobs of the batch that were enqueued (they run). `pending_ids`: jobs whose
    record could not be removed either; the workers' sweeper publishes them once Redis is back,
    so they run too. Every other job of the batch left nothing behind.
    """

    def __init__(self, message: str, published_ids: list[str], pending_ids: list[str]) -> None:
        super().__init__(message)
        self.published_ids = published_ids
        self.pending_ids = pending_ids


class JobNotFound(KeyError):
    def __str__(self) -> str:
        return f"job {self.args[0]}: no such job (unknown id, or its record expired)"


@dataclass(frozen=True)
class _Prepared:
    job_id: str
    spec: ValidSpec
    record: dict[str, str]


@dataclass(frozen=True)
class _BatchInfo:
    id: str
    callback_url: str | None
    owner: str
    signer: str | None


@dataclass(frozen=True)
class Batch:
    """What `enqueue_batch` returns: the batch id and its jobs, in request order."""

    id: str
    jobs: list[Job]
    created: bool = True  # False when the batch's idempotency key returned an earlier batch


class Uploads:
    def __init__(self, settings: SharedSettings, redis_retry_seconds: float = 10.0) -> None:
        self.settings = settings
        self.redis_retry_seconds = redis_retry_seconds
        self.redis = redis_client(
            settings.redis_url, socket_connect_timeout=3, socket_timeout=10, decode_responses=False
        )
        self.store = JobStore(self.redis, settings.record_ttl_seconds)
        self.batches = BatchStore(self.redis, self.store)
        self._app = publisher_app(settings.redis_url)
        self._templates = Templates(self._app) if fast_path_supported(settings.redis_url) else None

    @classmethod
    def from_env(cls) -> Uploads:
        return cls(SharedSettings.from_env())

    def close(self) -> None:
        self.redis.close()
        self._app.close()

    def __enter__(self) -> Uploads:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- enqueue -----------------------------------------------------------------------------
    def enqueue(
        self,
        source: str | Path | bytes,
        *,
        to: str,
        workspace: str = DEFAULT_WORKSPACE,
        name: str | None = None,
        description: str | None = None,
        idempotency_key: str | None = None,
        content_type: str | None = None,
        on_existing: str = "new",
        new_version_of: str | None = None,
        via: str = "workers",
        callback_url: str | None = None,
        on_done: str | None = None,
        signer: str | None = None,
        priority: str = "normal",
    ) -> Job:
        """One job; `on_existing`, `new_version_of` and `via`: see producers.recurring;
        `callback_url`, `on_done` and `signer`: see enqueue_many and producers.endings;
        `priority`: high, normal or bulk, among the jobs of the same workspace."""
        spec = JobSpec(
            source, to, workspace, name, description, idempotency_key, content_type,
            on_existing=on_existing, new_version_of=new_version_of, via=via,
            callback_url=callback_url, on_done=on_done, priority=priority,
        )
        return self.enqueue_many([spec], signer=signer)[0]

    def enqueue_many(self, specs: Sequence[JobSpec], *, signer: str | None = None) -> list[Job]:
        """Validate every spec first (one bad spec enqueues nothing), then stage, record, publish.

        Records are written in one pipelined round trip and messages in one more (pre-built,
        producers.messages). `signer`: the API token (producers.api_tokens) whose callback
        secret signs the jobs' callbacks; a `callback_url` needs one.
        """
        valid = self._validate(specs, signer, indexed=False)
        return self._enqueue_valid(valid, signer, None)

    def enqueue_batch(
        self,
        specs: Sequence[JobSpec],
        *,
        callback_url: str | None = None,
        idempotency_key: str | None = None,
        signer: str | None = None,
        owner: str = "",
    ) -> Batch:
        """Many jobs as one batch: `callback_url` is called once, when the last of them ends.

        The batch as a whole is idempotent (`idempotency_key`, scoped to `owner`); its jobs
        take none of their own. Errors name the job: `jobs[3].to: ...`.
        """
        if not specs:
            raise SpecError("jobs", "a batch needs at least one job")
        if len(specs) > MAX_BATCH_JOBS:
            raise SpecError("jobs", f"{len(specs)} jobs: at most {MAX_BATCH_JOBS} per batch")
        for i, s in enumerate(specs):
            if s.idempotency_key is not None:
                raise SpecError(
                    f"jobs[{i}].idempotency_key", "not taken inside a batch (the batch takes one)"
                )
        check_callback_url(callback_url, self.settings.callback_hosts)
        if callback_url and not signer:
            raise SpecError("callback_url", "needs an API token to sign with (signer)")
        valid = self._validate(specs, signer, indexed=True)
        scope = owner or "-"
        batch_id = BatchStore.new_id()
        if idempotency_key is not None:
            check_idempotency_key(idempotency_key)
            earlier = self._retry(
                partial(self.batches.claim_idempotency_key, scope, idempotency_key, batch_id)
            )
            if earlier is not None:
                page = self._retry(partial(self.batches.page, earlier, 0, len(specs)))
                return Batch(earlier, page.jobs if page else [], created=False)
        try:
            jobs = self._enqueue_valid(valid, signer, _BatchInfo(batch_id, callback_url, owner, signer))
        except BaseException:
            if idempotency_key is not None:
                self.batches.release_idempotency_key(scope, idempotency_key)
            raise
        return Batch(batch_id, jobs)

    def batch(self, batch_id: str, cursor: int = 0, limit: int = 100) -> BatchPage:
        check_batch_id(batch_id)
        page = self._retry(partial(self.batches.page, batch_id, cursor, limit))
        if page is None:
            raise JobNotFound(batch_id)
        return page

    def _validate(self, specs: Sequence[JobSpec], signer: str | None, indexed: bool) -> list[ValidSpec]:
        known = self._retry(self.known_workspaces)
        hosts, callbacks = self.settings.source_url_hosts, self.settings.callback_hosts
        out = []
        for i, s in enumerate(specs):
            try:
                v = by_url_checked(validate(s, known, hosts, callbacks), self.settings.sandbox_test_mode)
                if v.callback_url and not signer:
                    raise SpecError("callback_url", "needs an API token to sign with (signer)")
            except SpecError as exc:
                if not indexed:
                    raise
                raise SpecError(f"jobs[{i}].{exc.field}", exc.message) from None
            out.append(v)
        return out

    def _enqueue_valid(
        self,
        valid: list[ValidSpec],
        signer: str | None,
        batch: _BatchInfo | None,
    ) -> list[Job]:
        existing: dict[int, Job] = {}
        keyed = [(i, v) for i, v in enumerate(valid) if v.idempotency_key]
        if keyed:
            found = self._retry(lambda: self._find_idempotent([v for _, v in keyed]))
            for (i, _), job in zip(keyed, found, strict=True):
                if job is not None:
                    existing[i] = job
        prepared: dict[int, _Prepared] = {}
        try:
            for i, v in enumerate(valid):
                if i not in existing:
                    prepared[i] = self._prepare(v, signer, batch.id if batch else None)
            created = self._retry(lambda: self._create_records(list(prepared.values()), batch))
        except BaseException:
            for p in prepared.values():
                self._discard_staging(p)
            raise
        for i, (job_id, was_created) in zip(list(prepared), created, strict=True):
            if not was_created:  # an idempotency key raced with another producer
                self._discard_staging(prepared.pop(i))
                existing[i] = self._job(job_id, created=False)
        try:
            self._publish(list(prepared.values()))
        except PublishFailed as exc:
            if batch is not None:
                gone = [p.job_id for p in prepared.values() if p.job_id not in exc.published_ids]
                gone = [j for j in gone if j not in exc.pending_ids]
                try:
                    self.batches.forget_jobs(batch.id, gone)
                except redis.exceptions.RedisError:
                    log.warning("batch %s: could not drop %d unpublished job(s)", batch.id, len(gone))
            raise
        out: list[Job] = []
        for i in range(len(valid)):
            if i in existing:
                out.append(existing[i])
            else:  # what was just written, without reading it back
                out.append(Job.from_record({**prepared[i].record, "published": "1"}))
        return out

    def _find_idempotent(self, valid: list[ValidSpec]) -> list[Job | None]:
        """Jobs that earlier requests created under these idempotency keys, in two round trips."""
        from producers.records import idempotency_key  # (the enqueue methods' parameter name)

        pipe = self.redis.pipeline(transaction=False)
        for v in valid:
            pipe.get(idempotency_key(v.workspace, v.idempotency_key or ""))
        ids = [None if r is None else _s(r) for r in pipe.execute()]
        known = [i for i in ids if i is not None and is_job_id(i)]
        records = dict(zip(known, self.store.get_many(known), strict=True)) if known else {}
        out: list[Job | None] = []
        for job_id in ids:
            record = records.get(job_id) if job_id else None
            out.append(Job.from_record(record, created=False) if record else None)
        return out

    def known_workspaces(self) -> set[str] | None:
        """Registered connections (producers.connections), plus the names of
        AWORK_WORKSPACES_FILE, else `default` plus what running workers announced. A connection
        that was removed is in none of these, so enqueueing to it is refused here."""
        if self.settings.workspaces_file is not None:
            registered = ConnectionRegistry(self.redis).names()
            return set(read_workspaces_file(self.settings.workspaces_file)) | registered
        pipe = self.redis.pipeline(transaction=False)  # both sets in one round trip
        pipe.smembers(CONNECTIONS_KEY)
        pipe.smembers(WORKSPACES_KEY)
        registered, announced = pipe.execute()
        return {_s(m) for m in registered | announced} | {DEFAULT_WORKSPACE}

    def _prepare(self, v: ValidSpec, signer: str | None = None, batch_id: str | None = None) -> _Prepared:
        job_id = v.streamed.job_id if v.streamed is not None else new_job_id()
        owned, md5, size = False, None, v.size
        if v.url is not None:
            source_kind, source = "url", v.url
        elif v.streamed is not None:
            source_kind, source, owned, md5 = "file", str(v.streamed.path), True, v.streamed.md5_b64
        else:
            mode = self.settings.staging_mode
            if v.data is not None:
                staged = staging.stage_bytes(v.data, self.settings.staging_dir, job_id, v.file_name, mode)
            else:
                assert v.path is not None
                staged = staging.stage_file(
                    v.path,
                    self.settings.staging_dir,
                    job_id,
                    v.file_name,
                    self.settings.single_put_threshold,
                    self.settings.block_size,
                    mode,
                )
            source_kind, source, owned, md5 = "file", str(staged.path), staged.owned, staged.md5_b64
            size = staged.size  # what staging saw on the descriptor it read (may differ from validate's)
            if size > v.target.max_bytes:
                if staged.owned:
                    staging.remove_job_dir(self.settings.staging_dir, job_id)
                raise SpecError("path", f"grew to {size} bytes, over the {v.target.max_bytes} byte cap")
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
            "size": "" if size is None else str(size),
            "source_kind": source_kind,
            "source": source,
            "staged_owned": "1" if owned else "0",
            "source_md5": md5 or "",
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
        return _Prepared(job_id, v, record)

    def _create_records(
        self, prepared: list[_Prepared], batch: _BatchInfo | None = None
    ) -> list[tuple[str, bool]]:
        items = [(p.record, p.spec.idempotency_key) for p in prepared]
        if batch is None:
            return self.store.create_many(items)

        def write_batch(pipe: object) -> None:
            assert batch is not None
            ids = [p.job_id for p in prepared]
            self.batches.write(pipe, batch.id, ids, batch.callback_url, batch.signer, batch.owner)

        return self.store.create_many(items, before=write_batch)

    def _publish(self, prepared: list[_Prepared]) -> None:
        if not prepared:
            return
        published: list[_Prepared] = []
        # Jobs of a recurring flow (producers.recurring) start with a task of their own, sent
        # through Celery; the default canvases go as pre-built messages where the broker allows.
        # One pass: `p not in flows` compared every job with every other (seconds per 10,000).
        flows: list[_Prepared] = []
        rendered: list[_Prepared] = []
        for p in prepared:
            (flows if p.spec.placement.flow or self._templates is None else rendered).append(p)
        try:
            if flows:
                with self._app.producer_or_acquire() as producer:
                    for p in flows:
                        kwargs = step_kwargs(p.job_id, p.spec.workspace, str(p.spec.target), p.spec.file_name)
                        canvas = flow_canvas(
                            self._app, p.spec.placement.flow, kwargs, p.spec.priority
                        ) or job_canvas(self._app, p.spec.target.three_steps, kwargs, p.spec.priority)
                        canvas.apply_async(producer=producer)
                        published.append(p)
            if rendered:
                assert self._templates is not None
                templates = self._templates
                messages: list[Rendered] = []
                for p in rendered:
                    kwargs = step_kwargs(p.job_id, p.spec.workspace, str(p.spec.target), p.spec.file_name)
                    messages.append(templates.render(p.spec.target.three_steps, kwargs, p.spec.priority))
                keys = [job_key(p.job_id) for p in rendered]
                self._retry_publish(lambda: publish_rendered(self.redis, messages, keys))
                # (marked published in the same transaction as the messages)
        except (OperationalError, redis.exceptions.RedisError, OSError, RedisUnavailable) as exc:
            sent = {p.job_id for p in published}
            pending = self._undo([p for p in prepared if p.job_id not in sent])
            self._mark_published(published)
            text = f"REDIS_URL: could not publish to {redact_url(self.settings.redis_url)}: {exc}"
            if published:
                text += f"; {len(published)} job(s) of the batch were enqueued"
            if pending:
                text += (
                    f"; {len(pending)} job record(s) could not be removed ({', '.join(pending[:5])}): "
                    "the workers publish them once Redis is back, do not enqueue them again"
                )
            raise PublishFailed(text, [p.job_id for p in published], pending) from None
        self._mark_published(published)

    def _retry_publish(self, fn: Callable[[], None]) -> None:
        """Celery's publish retry policy, for the pre-built messages: a MULTI/EXEC that did not
        reach Redis is sent again; one whose answer was lost may leave messages behind that
        the workers drop (their records are undone)."""
        policy = self._app.conf.task_publish_retry_policy
        delay = float(policy.get("interval_start", 0.2))
        step, ceiling = float(policy.get("interval_step", 0.5)), float(policy.get("interval_max", 2))
        for attempt in range(int(policy.get("max_retries", 5)) + 1):
            try:
                return fn()
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                if attempt >= int(policy.get("max_retries", 5)):
                    raise
                time.sleep(delay)
                delay = min(delay + step, ceiling)

    def _undo(self, failed: list[_Prepared]) -> list[str]:
        """Remove the records and staged bytes of jobs whose message did not go out; returns the
        ids whose record could not be removed (Redis still unreachable): those keep their bytes."""
        pending: list[str] = []
        for p in failed:
            try:
                self._retry(partial(self.store.delete, p.job_id, p.spec.idempotency_key, p.spec.workspace))
            except RedisUnavailable:
                pending.append(p.job_id)
                continue
            self._discard_staging(p)
        return pending

    def _mark_published(self, published: list[_Prepared]) -> None:
        """Best effort: the messages are out, so the jobs are enqueued whatever happens here; a
        record left at published=0 only costs the sweeper a second, harmless publish."""
        if not published:
            return
        pipe = self.redis.pipeline(transaction=False)
        for p in published:
            pipe.hset(job_key(p.job_id), "published", "1")
        try:
            pipe.execute()
        except redis.exceptions.RedisError as exc:
            log.warning("enqueued %d job(s) but could not mark them published: %s", len(published), exc)

    def _discard_staging(self, p: _Prepared) -> None:
        if p.record.get("staged_owned") == "1":
            staging.remove_job_dir(self.settings.staging_dir, p.job_id)

    # -- cancel ------------------------------------------------------------------------------
    def cancel(self, job_ids: Iterable[str]) -> list[Job]:
        """Cancel jobs (see producers.cancel): each is `canceled` now, or marked to stop at its
        next block or fence check. JobNotFound / CancelRefused (linked, ended) stop at the
        first such job; the jobs before it are canceled."""
        ids = [check_job_id(i) for i in job_ids]
        out: list[Job] = []
        for job_id in ids:
            result = self._retry(partial(cancel_script, self.redis, job_id, self.settings.record_ttl_seconds))
            if result.outcome == "missing":
                raise JobNotFound(job_id)
            if result.outcome in ("linked", "ended"):
                raise CancelRefused(job_id, result.outcome, result.previous_state)
            record = self._record(job_id)
            if result.outcome == "canceled" and result.previous_state != JobState.CANCELED.value:
                self._after_cancel(job_id, record)  # canceled by this call (not an earlier one)
            out.append(Job.from_record(record))
        return out

    def _after_cancel(self, job_id: str, record: dict[str, str]) -> None:
        """Remove the staged copy (no step will) and announce the end."""
        if record.get("staged_owned") == "1":
            staging.remove_job_dir(self.settings.staging_dir, job_id)
        if record.get("notify") == "1":
            self._retry(lambda: announce(self.redis, self._app, [job_id]))

    # -- status ------------------------------------------------------------------------------
    def status(self, job_id: str) -> Job:
        return self._job(job_id)

    def statuses(self, job_ids: Iterable[str]) -> list[Job]:
        ids = [check_job_id(i) for i in job_ids]
        records = self._retry(lambda: self.store.get_many(ids))
        out = []
        for job_id, record in zip(ids, records, strict=True):
            if record is None:
                raise JobNotFound(job_id)
            out.append(Job.from_record(record))
        return out

    def wait(self, job_id: str, timeout: float | None = None, poll: float = 0.25) -> Job:
        return self.wait_many([job_id], timeout, poll)[0]

    def wait_many(
        self,
        job_ids: Sequence[str],
        timeout: float | None = None,
        poll: float = 0.25,
        on_update: Callable[[list[Job]], None] | None = None,
    ) -> list[Job]:
        """Poll the records until every job has ended; TimeoutError names the unfinished ones.

        Only jobs still running are read again, so waiting on a large batch stays cheap.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        latest: dict[str, Job] = {}
        pending = list(dict.fromkeys(job_ids))
        while True:
            for job in self.statuses(pending):
                latest[job.id] = job
            pending = [i for i in pending if not latest[i].finished]
            if on_update:
                on_update([latest[i] for i in job_ids])
            if not pending:
                return [latest[i] for i in job_ids]
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{len(pending)} job(s) still running: {', '.join(pending[:5])}")
            time.sleep(poll)

    def jobs(self, state: str | None = None, limit: int = 100) -> list[Job]:
        if state is not None and state not in {s.value for s in JobState}:
            raise SpecError(
                "state", f"unknown state {state!r} (one of {', '.join(s.value for s in JobState)})"
            )
        listed = self._retry(lambda: self.store.list_ids(limit=max(limit * 4, 1000)))
        ids = [i for i in listed if is_job_id(i)]  # the index is read back: anything else is not ours
        records = self._retry(lambda: self.store.get_many(ids))
        gone = [i for i, r in zip(ids, records, strict=True) if r is None]
        self.store.prune_index(gone)
        jobs = [Job.from_record(r) for r in records if r is not None]
        if state is not None:
            jobs = [j for j in jobs if j.state.value == state]
        return jobs[:limit]

    # -- helpers -----------------------------------------------------------------------------
    def _job(self, job_id: str, created: bool = True) -> Job:
        return Job.from_record(self._record(job_id), created=created)

    def _record(self, job_id: str) -> dict[str, str]:
        check_job_id(job_id)
        record = self._retry(lambda: self.store.get(job_id))
        if record is None:
            raise JobNotFound(job_id)
        return record

    def _retry(self, fn: Callable[[], T]) -> T:
        """Retry on connection errors for a bounded time, then say which Redis is unreachable."""
        deadline = time.monotonic() + self.redis_retry_seconds
        delay = 0.1
        while True:
            try:
                return fn()
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
                if time.monotonic() + delay > deadline:
                    raise RedisUnavailable(
                        f"REDIS_URL: Redis at {redact_url(self.settings.redis_url)} is unreachable ({exc})"
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 1.0)


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


__all__ = [
    "Batch",
    "CancelRefused",
    "ConfigError",
    "JobNotFound",
    "PublishFailed",
    "RedisUnavailable",
    "Uploads",
]
