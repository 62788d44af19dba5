"""The Python API other applications use: `Uploads.from_env().enqueue(path, to="task:<id>")`.

Enqueueing validates every spec first, stages and builds the records (producers.prepare),
writes the records, then publishes (producers.publish, which says why that order is safe).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import redis

from producers import staging
from producers.batches import MAX_BATCH_JOBS, BatchPage, BatchStore, check_batch_id
from producers.callback_url import check_callback_url
from producers.cancel import CancelRefused, cancel_script
from producers.canvas import publisher_app
from producers.config import (
    DEFAULT_WORKSPACE,
    ConfigError,
    SharedSettings,
    read_workspaces_file,
)
from producers.connections import ConnectionRegistry
from producers.contract import JobState, SpecError
from producers.endings import announce
from producers.job_ids import check_job_id, is_job_id
from producers.job_queries import JobNotFound, JobQueries
from producers.keys import CONNECTIONS_KEY, WORKSPACES_KEY
from producers.keys import idempotency_key as idem_key  # (a parameter of the enqueue methods)
from producers.messages import Templates, fast_path_supported
from producers.prepare import Prepared, discard_staging, prepare
from producers.public_source import by_url_checked
from producers.publish import PublishFailed, publish
from producers.records import Job, JobStore
from producers.redis_conn import redis_client
from producers.redis_retry import RedisUnavailable
from producers.redis_text import as_str
from producers.spec import JobSpec, ValidSpec, check_idempotency_key, validate

log = logging.getLogger("awork.producer")



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


class Uploads(JobQueries):
    """Enqueue, cancel and follow jobs (the reads: producers.job_queries) against one Redis."""

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
        prepared: dict[int, Prepared] = {}
        try:
            for i, v in enumerate(valid):
                if i not in existing:
                    prepared[i] = prepare(v, self.settings, signer, batch.id if batch else None)
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
        pipe = self.redis.pipeline(transaction=False)
        for v in valid:
            pipe.get(idem_key(v.workspace, v.idempotency_key or ""))
        ids = [None if r is None else as_str(r) for r in pipe.execute()]
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
        return {as_str(m) for m in registered | announced} | {DEFAULT_WORKSPACE}

    def _create_records(
        self, prepared: list[Prepared], batch: _BatchInfo | None = None
    ) -> list[tuple[str, bool]]:
        items = [(p.record, p.spec.idempotency_key) for p in prepared]
        if batch is None:
            return self.store.create_many(items)

        def write_batch(pipe: object) -> None:
            assert batch is not None
            ids = [p.job_id for p in prepared]
            self.batches.write(pipe, batch.id, ids, batch.callback_url, batch.signer, batch.owner)

        return self.store.create_many(items, before=write_batch)

    def _publish(self, prepared: list[Prepared]) -> None:
        publish(prepared, self._app, self._templates, self.redis, self.settings.redis_url, self._undo)

    def _undo(self, failed: list[Prepared]) -> list[str]:
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

    def _discard_staging(self, p: Prepared) -> None:
        discard_staging(self.settings, p)

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


__all__ = [
    "Batch",
    "CancelRefused",
    "ConfigError",
    "JobNotFound",
    "PublishFailed",
    "RedisUnavailable",
    "Uploads",
]
