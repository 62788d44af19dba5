"""The job record: one Redis hash per job, the source of truth for status.

Producers create records; workers advance them. Celery's result backend and Flower are views,
not the truth. Field names here are the contract between the two sides.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import redis

from producers.contract import FINISHED_STATES, STEP_TASKS, JobState
from producers.keys import (
    ACTIVE_KEY,
    DEAD_KEY,
    ENDED_KEY,
    EVENTS_CHANNEL,
    INDEX_KEY,
    JOB_PREFIX,
    idempotency_key,
    job_key,
)
from producers.redis_text import as_str

IDEMPOTENCY_TTL_SECONDS = 30 * 24 * 3600
CREATE_CHUNK = 500  # records per call of create_job.lua

STEPS = tuple(STEP_TASKS)

_CREATE_SCRIPT = (Path(__file__).with_name("create_job.lua")).read_text()


@dataclass(frozen=True)
class JobError:
    step: str | None
    code: str | None
    description: str | None
    status: int | None
    trace_id: str | None


@dataclass(frozen=True)
class Job:
    """A read-only view of a job record."""

    id: str
    state: JobState
    workspace: str
    target: str
    file_name: str
    size: int | None
    bytes_sent: int
    file_id: str | None
    upload_id: str | None
    error: JobError | None
    created_at: float
    updated_at: float
    finished_at: float | None
    wait_reason: str | None
    wait_until: float | None
    attempts: dict[str, int]
    priority: str = "normal"
    created: bool = True  # False when an idempotency key returned an existing job
    # How a done job ended when it was not a new file: `version` (a new version of file_id),
    # `skipped` (file_id was there already); None for a new file (producers.recurring).
    outcome: str | None = None
    batch_id: str | None = None
    cancel_requested: bool = False  # a running step stops at its next block or fence check

    @property
    def finished(self) -> bool:
        return self.state in FINISHED_STATES

    def to_json(self) -> dict[str, Any]:
        """What dataclasses.asdict gives, built directly (asdict deep-copies: 30 us a job)."""
        out = {name: getattr(self, name) for name in _JOB_FIELDS}
        out["state"] = self.state.value
        out["attempts"] = dict(self.attempts)
        if self.error is not None:
            out["error"] = {name: getattr(self.error, name) for name in _ERROR_FIELDS}
        return out

    @classmethod
    def from_record(cls, record: Mapping[str, str], created: bool = True) -> Job:
        def num(name: str) -> float | None:
            raw = record.get(name)
            return float(raw) if raw not in (None, "") else None

        def text(name: str) -> str | None:
            raw = record.get(name)
            return raw if raw not in (None, "") else None

        error = None
        if text("error_code") or text("error_description"):
            status = num("error_status")
            error = JobError(
                step=text("error_step"),
                code=text("error_code"),
                description=text("error_description"),
                status=int(status) if status is not None else None,
                trace_id=text("error_trace_id"),
            )
        size = num("size")
        return cls(
            id=record["id"],
            state=JobState(record.get("state", "queued")),
            workspace=record.get("workspace", ""),
            target=record.get("target", ""),
            file_name=record.get("file_name", ""),
            size=int(size) if size is not None else None,
            bytes_sent=int(num("bytes_sent") or 0),
            file_id=text("file_id"),
            upload_id=text("upload_id"),
            error=error,
            created_at=num("created_at") or 0.0,
            updated_at=num("updated_at") or 0.0,
            finished_at=num("finished_at"),
            wait_reason=text("wait_reason"),
            wait_until=num("wait_until"),
            attempts={s: int(record.get(f"attempts_{s}", "0") or 0) for s in STEPS},
            priority=record.get("priority") or "normal",
            created=created,
            outcome=text("outcome"),
            batch_id=text("batch_id"),
            cancel_requested=record.get("cancel_requested") == "1",
        )


class JobStore:
    """Reads and writes job records. Every write stamps `updated_at`."""

    def __init__(self, client: redis.Redis, record_ttl_seconds: int = 7 * 24 * 3600) -> None:
        self.redis = client
        self.record_ttl_seconds = record_ttl_seconds

    # -- producers ---------------------------------------------------------------------------
    def create(self, record: Mapping[str, str], idem_key: str | None) -> tuple[str, bool]:
        """Write a new record unless `idem_key` already names a live job; return (id, created)."""
        return self.create_many([(record, idem_key)])[0]

    def create_many(
        self,
        items: Sequence[tuple[Mapping[str, str], str | None]],
        before: Callable[[Any], None] | None = None,
    ) -> list[tuple[str, bool]]:
        """Create records in one pipelined round trip; an existing job wins its idempotency key.

        `before` queues more commands ahead of the records on the same pipeline (a batch's hash);
        their results are not returned. The script goes as EVAL, not as a registered Script: on
        a pipeline, redis-py checks a Script with SCRIPT EXISTS first, a round trip more per call
        (the text is 1.3 kB next to up to 500 records)."""
        if not items:
            return []
        pipe = self.redis.pipeline(transaction=False)
        skip = 0
        if before is not None:
            before(pipe)
            skip = len(pipe.command_stack)
        for start in range(0, len(items), CREATE_CHUNK):
            args: list[str | int] = [IDEMPOTENCY_TTL_SECONDS, JOB_PREFIX]
            for record, idem_key in items[start : start + CREATE_CHUNK]:
                idem = idempotency_key(record["workspace"], idem_key) if idem_key else ""
                args += [record["id"], record["created_at"], idem, 2 * len(record)]
                for kv in record.items():
                    args += kv
            pipe.eval(_CREATE_SCRIPT, 2, INDEX_KEY, ACTIVE_KEY, *args)
        out: list[tuple[str, bool]] = []
        for flat in pipe.execute()[skip:]:
            out += [(as_str(flat[i]), bool(int(flat[i + 1]))) for i in range(0, len(flat), 2)]
        return out

    def delete(self, job_id: str, idem_key: str | None, workspace: str) -> None:
        """Undo a create whose message could not be published (nothing half-done)."""
        pipe = self.redis.pipeline()
        pipe.delete(job_key(job_id))
        pipe.zrem(INDEX_KEY, job_id)
        pipe.zrem(ACTIVE_KEY, job_id)
        if idem_key:
            pipe.delete(idempotency_key(workspace, idem_key))
        pipe.execute()

    # -- reads -------------------------------------------------------------------------------
    def get(self, job_id: str) -> dict[str, str] | None:
        raw = self.redis.hgetall(job_key(job_id))
        if not raw:
            return None
        return {as_str(k): as_str(v) for k, v in raw.items()}

    def get_many(self, job_ids: Iterable[str]) -> list[dict[str, str] | None]:
        ids = list(job_ids)
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hgetall(job_key(job_id))
        return [{as_str(k): as_str(v) for k, v in raw.items()} or None for raw in pipe.execute()]

    def list_ids(self, limit: int = 1000, newest_first: bool = True) -> list[str]:
        ids: list[bytes] = self.redis.zrange(INDEX_KEY, 0, limit - 1, desc=newest_first)  # type: ignore[assignment]
        return [as_str(i) for i in ids]

    def prune_index(self, job_ids: Iterable[str]) -> None:
        """Drop ids whose records expired from the indexes."""
        ids = list(job_ids)
        if ids:
            pipe = self.redis.pipeline(transaction=False)
            pipe.zrem(INDEX_KEY, *ids)
            pipe.zrem(DEAD_KEY, *ids)
            pipe.execute()

    # -- workers -----------------------------------------------------------------------------
    def update(self, job_id: str, **fields: object) -> None:
        mapping: dict[Any, Any] = encode_update(**fields)  # (redis-py's Mapping is invariant)
        self.redis.hset(job_key(job_id), mapping=mapping)

    def clear(self, job_id: str, *fields: str) -> None:
        if fields:
            self.redis.hdel(job_key(job_id), *fields)

    def incr(self, job_id: str, field: str, by: int = 1) -> int:
        pipe = self.redis.pipeline()
        pipe.hincrby(job_key(job_id), field, by)
        pipe.hset(job_key(job_id), "updated_at", _now())
        return int(pipe.execute()[0])

    def start_step(self, job_id: str, step: str, state: str, clear: Sequence[str] = ()) -> int:
        """Mark a step as running (and the job's state), removing the `clear` fields (a wait that
        is over), in one round trip; return its attempt."""
        now = _now()
        pipe = self.redis.pipeline(transaction=False)  # one hash, in order: no MULTI needed
        pipe.hincrby(job_key(job_id), f"attempts_{step}", 1)
        pipe.hset(
            job_key(job_id), mapping={"state": state, "running": step, "heartbeat_at": now, "updated_at": now}
        )
        if clear:
            pipe.hdel(job_key(job_id), *clear)
        return int(pipe.execute()[0])

    def finish(
        self,
        job_id: str,
        state: JobState,
        notify: bool = False,
        drop: Sequence[str] = (),
        clear: Sequence[str] = (),
        **fields: object,
    ) -> None:
        """End a job: set the final state, start its expiry, keep failures in the dead letters;
        `drop`: keys of no more use once it has ended (deleted in the same transaction);
        `clear`: record fields removed with it.

        `notify` (the record's `notify` field: a callback or a batch waits for the job's end):
        the job joins ENDED_KEY in the same transaction, so its announcement survives a crash
        right after this write (producers.endings)."""
        now = time.time()
        mapping: dict[Any, Any] = {k: _encode(v) for k, v in fields.items()}
        mapping.update(state=state.value, finished_at=repr(now), updated_at=repr(now))
        pipe = self.redis.pipeline()
        key = job_key(job_id)
        pipe.hset(key, mapping=mapping)
        # The upload URL is a write credential: it has no use once the job has ended.
        pipe.hdel(key, "upload_url", *clear)
        pipe.expire(key, self.record_ttl_seconds)
        pipe.zrem(ACTIVE_KEY, job_id)
        if state in (JobState.FAILED, JobState.DEAD):
            pipe.zadd(DEAD_KEY, {job_id: now})
        else:
            pipe.zrem(DEAD_KEY, job_id)
        if notify:
            pipe.zadd(ENDED_KEY, {job_id: now})
        if drop:
            pipe.delete(*drop)
        pipe.publish(EVENTS_CHANNEL, json.dumps({"id": job_id, "state": state.value}))
        pipe.execute()


_JOB_FIELDS = tuple(f.name for f in fields(Job))
_ERROR_FIELDS = tuple(f.name for f in fields(JobError))


def _now() -> str:
    return repr(time.time())


def encode_update(**fields: object) -> dict[str, str]:
    """A record update as Redis stores it (None "", booleans "1"/"0"), stamped `updated_at`."""
    mapping = {k: _encode(v) for k, v in fields.items()}
    mapping["updated_at"] = _now()
    return mapping


def _encode(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return repr(value)
    return str(value)
