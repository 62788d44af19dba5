"""Batches: many jobs handed over in one request, with one callback when the last one ends.

A batch is a hash (producers.keys.batch_key: total, open, callback_url, signer, created_at)
and a zset of its job ids in request order (batch_jobs_key), written in the same round trip as
the jobs' records. `open` counts down once per job ending (producers.endings.lua), so the batch
callback fires exactly when the last job has ended, whichever process ended it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis

from producers.contract import SpecError
from producers.job_ids import is_job_id, new_job_id
from producers.job_record import Field, read
from producers.keys import batch_idempotency_key, batch_jobs_key, batch_key, job_key
from producers.records import IDEMPOTENCY_TTL_SECONDS, Job, JobStore
from producers.redis_text import as_str

MAX_BATCH_JOBS = 10_000
MAX_PAGE = 1000


def check_batch_id(value: object) -> str:
    """Batch ids have the job-id format (32 lowercase hex digits)."""
    if not is_job_id(value):
        raise SpecError("batch_id", f"malformed batch id {str(value)[:80]!r}: expected 32 hex digits")
    return str(value)


@dataclass(frozen=True)
class BatchPage:
    id: str
    total: int
    open: int
    counts: dict[str, int]
    created_at: float
    finished_at: float | None
    jobs: list[Job]
    next_cursor: str | None
    owner: str = ""  # the API token that created it (not shown: the intake checks it)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "total": self.total,
            "open": self.open,
            "counts": self.counts,
            "created_at": self.created_at,
            "finished_at": self.finished_at,
            "jobs": [j.to_json() for j in self.jobs],
            "next_cursor": self.next_cursor,
        }


class BatchStore:
    def __init__(self, client: redis.Redis, store: JobStore) -> None:
        self.redis = client
        self.store = store

    @staticmethod
    def new_id() -> str:
        return new_job_id()

    def write(
        self,
        pipe: Any,
        batch_id: str,
        job_ids: Sequence[str],
        callback_url: str | None,
        signer: str | None,
        owner: str,
    ) -> None:
        """Queue the batch's hash and job list on `pipe` (the records' pipeline)."""
        now = repr(time.time())
        pipe.hset(
            batch_key(batch_id),
            mapping={
                "id": batch_id,
                "total": len(job_ids),
                "open": len(job_ids),
                "callback_url": callback_url or "",
                "signer": signer or "",
                "owner": owner,
                "created_at": now,
            },
        )
        pipe.zadd(batch_jobs_key(batch_id), {j: i for i, j in enumerate(job_ids)})
        ttl = self.store.record_ttl_seconds + IDEMPOTENCY_TTL_SECONDS
        pipe.expire(batch_key(batch_id), ttl)
        pipe.expire(batch_jobs_key(batch_id), ttl)

    def forget_jobs(self, batch_id: str, job_ids: Sequence[str]) -> None:
        """Jobs whose records were undone (their publish failed) leave the batch's counts."""
        if not job_ids:
            return
        pipe = self.redis.pipeline()
        pipe.zrem(batch_jobs_key(batch_id), *job_ids)
        pipe.hincrby(batch_key(batch_id), "open", -len(job_ids))
        pipe.hincrby(batch_key(batch_id), "total", -len(job_ids))
        pipe.execute()

    def find_by_idempotency_key(self, scope: str, key: str) -> str | None:
        found = self.redis.get(batch_idempotency_key(scope, key))
        if found is None:
            return None
        batch_id = as_str(found)
        return batch_id if self.redis.exists(batch_key(batch_id)) else None

    def claim_idempotency_key(self, scope: str, key: str, batch_id: str) -> str | None:
        """Bind the key to this batch unless it names a batch already (returned then)."""
        k = batch_idempotency_key(scope, key)
        if self.redis.set(k, batch_id, nx=True, ex=IDEMPOTENCY_TTL_SECONDS):
            return None
        return self.find_by_idempotency_key(scope, key)

    def release_idempotency_key(self, scope: str, key: str) -> None:
        self.redis.delete(batch_idempotency_key(scope, key))

    def page(self, batch_id: str, cursor: int = 0, limit: int = 100) -> BatchPage | None:
        """Counts by state over every job of the batch, and one page of its jobs: two round
        trips (the batch and its ids, then every job's state and the page's records)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(batch_key(batch_id))
        pipe.zrange(batch_jobs_key(batch_id), 0, -1)
        raw, members = pipe.execute()
        if not raw:
            return None
        info = {as_str(k): as_str(v) for k, v in raw.items()}
        ids = [as_str(i) for i in members]
        limit = max(1, min(limit, MAX_PAGE))
        chosen = ids[cursor : cursor + limit]
        for job_id in ids:
            pipe.hget(job_key(job_id), Field.STATE)
        for job_id in chosen:
            pipe.hgetall(job_key(job_id))
        answers = pipe.execute()
        counts: dict[str, int] = {}
        for state in answers[: len(ids)]:
            name = "expired" if state is None else as_str(state)
            counts[name] = counts.get(name, 0) + 1
        records = [read(job_id, raw) for job_id, raw in zip(chosen, answers[len(ids) :], strict=True)]
        jobs = [r.job() for r in records if r is not None]
        nxt = cursor + limit
        return BatchPage(
            id=batch_id,
            total=int(info.get("total") or 0),
            open=int(info.get("open") or 0),
            counts=counts,
            created_at=float(info.get("created_at") or 0),
            finished_at=float(info["finished_at"]) if info.get("finished_at") else None,
            jobs=jobs,
            next_cursor=str(nxt) if nxt < len(ids) else None,
            owner=info.get("owner", ""),
        )
