"""Dead letters: jobs that ended `failed` or `dead`, listed, re-driven or purged by an operator.

`retry` re-drives a job from the step that failed: a link that failed reuses the upload that was
already made; a failed PUT starts with a fresh upload URL. The staged bytes of failed jobs are
kept until `purge`, so a retry has something to send.
"""

from __future__ import annotations

import logging
import time

from producers import staging
from producers.client import JobNotFound, Uploads
from producers.contract import JobState
from producers.job_ids import check_job_id, is_job_id
from producers.job_record import Field, read, step_field
from producers.keys import ACTIVE_KEY, DEAD_KEY, INDEX_KEY, block_journal_key, job_key
from producers.records import STEPS, Job
from producers.recurring import first_step
from producers.redrive import canvas_from, resume_step

log = logging.getLogger("awork.producer")

RESET_FIELDS = (
    Field.ERROR_STEP,
    Field.ERROR_CODE,
    Field.ERROR_DESCRIPTION,
    Field.ERROR_STATUS,
    Field.ERROR_TRACE_ID,
    Field.FINISHED_AT,
    Field.WAIT_REASON,
    Field.WAIT_UNTIL,
    Field.URL_RENEWALS,
    *(step_field("errors", s) for s in STEPS),
    Field.RUNNING,
    *(step_field("crashes", s) for s in STEPS),
)


class DeadLetters:
    def __init__(self, uploads: Uploads) -> None:
        self.up = uploads
        self.redis = uploads.redis

    def jobs(self, limit: int = 1000) -> list[Job]:
        ids = _job_ids(self.redis.zrange(DEAD_KEY, 0, limit - 1))  # type: ignore[arg-type]
        records = self.up.store.get_many(ids)
        self.up.store.prune_index([i for i, r in zip(ids, records, strict=True) if r is None])
        readable = (read(i, r) for i, r in zip(ids, records, strict=True))
        return [r.job() for r in readable if r is not None]

    def retry(self, job_ids: list[str]) -> list[Job]:
        """Re-drive each job from the step that failed; returns the jobs, now queued again."""
        out = []
        for job_id in job_ids:
            check_job_id(job_id)
            record = self.up.store.get(job_id)
            if record is None:
                raise JobNotFound(job_id)
            state = record.get(Field.STATE)
            if state not in (JobState.FAILED.value, JobState.DEAD.value):
                raise ValueError(f"job {job_id}: state is {state}, not failed or dead")
            first = _retry_step(record)
            pipe = self.redis.pipeline()
            key = job_key(job_id)
            pipe.hdel(key, *RESET_FIELDS)
            pipe.hset(key, mapping={Field.STATE: JobState.QUEUED.value, Field.UPDATED_AT: repr(time.time())})
            pipe.hincrby(key, Field.REDRIVES, 1)
            pipe.persist(key)
            pipe.zrem(DEAD_KEY, job_id)
            created = float(record.get(Field.CREATED_AT) or time.time())
            pipe.zadd(INDEX_KEY, {job_id: created})
            pipe.zadd(ACTIVE_KEY, {job_id: created})
            pipe.execute()
            # read before the message goes out: a worker may take it at once, and the caller is
            # told the state the retry set, not whichever step a worker reached meanwhile
            out.append(self.up.status(job_id))
            canvas_from(self.up._app, record, first).apply_async()
        return out

    def retry_all(self) -> list[Job]:
        return self.retry([j.id for j in self.jobs()])

    def purge(self, older_than_seconds: float) -> int:
        """Delete dead letters that ended more than `older_than_seconds` ago, with their bytes."""
        cutoff = time.time() - older_than_seconds
        ids = _job_ids(self.redis.zrangebyscore(DEAD_KEY, 0, cutoff))  # type: ignore[arg-type]
        for job_id in ids:
            record = self.up.store.get(job_id) or {}
            if record.get(Field.STAGED_OWNED) == "1":
                staging.remove_job_dir(self.up.settings.staging_dir, job_id)
            pipe = self.redis.pipeline()
            pipe.delete(job_key(job_id), block_journal_key(job_id))
            pipe.zrem(DEAD_KEY, job_id)
            pipe.zrem(INDEX_KEY, job_id)
            pipe.execute()
        return len(ids)


def _job_ids(raw: list[bytes]) -> list[str]:
    """Ids read back from the dead-letter set; anything not shaped like a job id is skipped
    (logged), so it never reaches a path or a delete."""
    out = []
    for item in raw:
        text = item.decode(errors="replace")
        if is_job_id(text):
            out.append(text)
        else:
            log.warning("dead letters: skipped malformed job id %r", text[:80])
    return out


def _retry_step(record: dict[str, str]) -> str:
    """Link again when the upload was made (a failed link); otherwise start with a fresh URL
    (finishing a job removes its upload URL)."""
    if first_step(record) is not None:  # a recurring-files flow starts its one step again
        return resume_step(record)
    if record.get(Field.ROUTE) == "multipart":
        return "multipart"
    return "link" if resume_step(record) == "link" else "generate"


def parse_duration(text: str) -> float:
    """`90s`, `15m`, `12h`, `7d`, `2w` or plain seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    raw = text.strip().lower()
    try:
        if raw and raw[-1] in units:
            return float(raw[:-1]) * units[raw[-1]]
        return float(raw)
    except ValueError:
        raise ValueError(f"--older-than: expected a duration like 90s, 15m, 12h, 7d, got {text!r}") from None
