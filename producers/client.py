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
from producers.canvas import job_canvas, publisher_app, step_kwargs
from producers.config import (
    DEFAULT_WORKSPACE,
    ConfigError,
    SharedSettings,
    read_workspaces_file,
    redact_url,
)
from producers.connections import ConnectionRegistry
from producers.contract import JobState, SpecError
from producers.job_ids import check_job_id, is_job_id, new_job_id
from producers.records import Job, JobStore
from producers.spec import JobSpec, ValidSpec, validate

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


class Uploads:
    def __init__(self, settings: SharedSettings, redis_retry_seconds: float = 10.0) -> None:
        self.settings = settings
        self.redis_retry_seconds = redis_retry_seconds
        self.redis = redis.Redis.from_url(
            settings.redis_url, socket_connect_timeout=3, socket_timeout=10, decode_responses=False
        )
        self.store = JobStore(self.redis, settings.record_ttl_seconds)
        self._app = publisher_app(settings.redis_url)

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
        priority: str = "normal",
    ) -> Job:
        """`priority`: high, normal or bulk, among the jobs of the same workspace."""
        spec = JobSpec(
            source, to, workspace, name, description, idempotency_key, content_type, priority=priority
        )
        return self.enqueue_many([spec])[0]

    def enqueue_many(self, specs: Sequence[JobSpec]) -> list[Job]:
        """Validate every spec first (one bad spec enqueues nothing), then stage, record, publish.

        Records are written in one pipelined round trip and messages over one connection.
        """
        known = self._retry(self.known_workspaces)
        valid = [validate(s, known, self.settings.source_url_hosts) for s in specs]
        existing: dict[int, Job] = {}
        for i, v in enumerate(valid):
            if v.idempotency_key:
                found = self._retry(
                    partial(self.store.find_by_idempotency_key, v.workspace, v.idempotency_key)
                )
                if found:
                    existing[i] = self._job(found, created=False)
        prepared: dict[int, _Prepared] = {}
        try:
            for i, v in enumerate(valid):
                if i not in existing:
                    prepared[i] = self._prepare(v)
            created = self._retry(lambda: self._create_records(list(prepared.values())))
        except BaseException:
            for p in prepared.values():
                self._discard_staging(p)
            raise
        for i, (job_id, was_created) in zip(list(prepared), created, strict=True):
            if not was_created:  # an idempotency key raced with another producer
                self._discard_staging(prepared.pop(i))
                existing[i] = self._job(job_id, created=False)
        self._publish(list(prepared.values()))
        out: list[Job] = []
        for i in range(len(valid)):
            out.append(existing[i] if i in existing else self._job(prepared[i].job_id))
        return out

    def known_workspaces(self) -> set[str] | None:
        """Registered connections (producers.connections), plus the names of
        AWORK_WORKSPACES_FILE, else `default` plus what running workers announced. A connection
        that was removed is in none of these, so enqueueing to it is refused here."""
        registered = ConnectionRegistry(self.redis).names()
        if self.settings.workspaces_file is not None:
            return set(read_workspaces_file(self.settings.workspaces_file)) | registered
        names = {_s(m) for m in self.redis.smembers(WORKSPACES_KEY)}
        return names | {DEFAULT_WORKSPACE} | registered

    def _prepare(self, v: ValidSpec) -> _Prepared:
        job_id = new_job_id()
        owned, md5, size = False, None, v.size
        if v.url is not None:
            source_kind, source = "url", v.url
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
        }
        return _Prepared(job_id, v, record)

    def _create_records(self, prepared: list[_Prepared]) -> list[tuple[str, bool]]:
        return self.store.create_many([(p.record, p.spec.idempotency_key) for p in prepared])

    def _publish(self, prepared: list[_Prepared]) -> None:
        if not prepared:
            return
        published: list[_Prepared] = []
        try:
            with self._app.producer_or_acquire() as producer:
                for p in prepared:
                    kwargs = step_kwargs(p.job_id, p.spec.workspace, str(p.spec.target), p.spec.file_name)
                    canvas = job_canvas(self._app, p.spec.target.three_steps, kwargs, p.spec.priority)
                    canvas.apply_async(producer=producer)
                    published.append(p)
        except (OperationalError, redis.exceptions.RedisError, OSError) as exc:
            failed = [p for p in prepared if p not in published]
            pending = self._undo(failed)
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
            pipe.hset(f"awork:job:{p.job_id}", "published", "1")
        try:
            pipe.execute()
        except redis.exceptions.RedisError as exc:
            log.warning("enqueued %d job(s) but could not mark them published: %s", len(published), exc)

    def _discard_staging(self, p: _Prepared) -> None:
        if p.record.get("staged_owned") == "1":
            staging.remove_job_dir(self.settings.staging_dir, p.job_id)

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
        check_job_id(job_id)
        record = self._retry(lambda: self.store.get(job_id))
        if record is None:
            raise JobNotFound(job_id)
        return Job.from_record(record, created=created)

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


__all__ = ["ConfigError", "JobNotFound", "PublishFailed", "RedisUnavailable", "Uploads"]
