"""The read side of `Uploads` (producers.client): a job's status, waiting for jobs to end,
listing jobs, each read retried through a Redis restart (producers.redis_retry)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

from producers.config import SharedSettings
from producers.contract import JobState, SpecError
from producers.job_ids import check_job_id, is_job_id
from producers.records import Job, JobStore
from producers.redis_retry import retry_redis

T = TypeVar("T")


class JobNotFound(KeyError):
    def __str__(self) -> str:
        return f"job {self.args[0]}: no such job (unknown id, or its record expired)"


class JobQueries:
    """Reads of job records; `Uploads` sets `settings`, `store` and `redis_retry_seconds`."""

    settings: SharedSettings
    store: JobStore
    redis_retry_seconds: float

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
        return retry_redis(fn, self.redis_retry_seconds, self.settings.redis_url)
