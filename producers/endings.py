"""A job's end, announced: one message to `awork.callbacks` per callback, at least once.

Whoever ends a job (the step that finishes it, a cancel, the sweeper for a worker that died in
between) calls `announce`: the job joined ENDED_KEY in the transaction that ended it
(`JobStore.finish(notify=True)`), a Lua script decides once what the ending announces (the
job's own callback, and its batch's when it was the batch's last open job), the messages go
out, and only then does the job leave ENDED_KEY. A crash in between leaves it there for the
sweeper, so a callback may be announced twice (the receiver de-duplicates on the event id) but
never lost. Only jobs with a callback or a batch are written to ENDED_KEY at all.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterable
from pathlib import Path

import redis
from celery import Celery

from producers.contract import QUEUE_CALLBACKS, TASK_DELIVER_CALLBACK
from producers.job_record import Field
from producers.keys import ENDED_KEY, batch_key, job_key
from producers.redis_text import as_str

log = logging.getLogger("awork.endings")

_ANNOUNCE = Path(__file__).with_name("endings.lua").read_text()
# Older entries are a worker's that died before announcing: the sweeper takes them over.
STALE_SECONDS = 30.0


def event_id(kind: str, ident: str, ended_at: str) -> str:
    """The same ending always gets the same id (a re-announcement is a duplicate, not news);
    a job re-driven after `dead` and ending again gets a new one."""
    return hashlib.sha256(f"{kind}:{ident}:{ended_at}".encode()).hexdigest()[:32]


def announce(client: redis.Redis, app: Celery, job_ids: Iterable[str]) -> int:
    """Announce the ends of these jobs; returns the callback messages sent."""
    script = client.register_script(_ANNOUNCE)
    sent = 0
    for job_id in job_ids:
        # both read before the script, which changes neither (it marks the batch, not these)
        raw_batch, raw_ended = client.hmget(job_key(job_id), [Field.BATCH_ID, Field.FINISHED_AT])
        batch_id, ended_at = as_str(raw_batch or b""), as_str(raw_ended or b"")
        keys = [job_key(job_id), ENDED_KEY, batch_key(batch_id) if batch_id else ""]
        what = [as_str(w) for w in script(keys=keys, args=[job_id])]
        for kind in what:
            ident = job_id if kind == "job" else batch_id
            kwargs = {"kind": kind, "id": ident, "event_id": event_id(kind, ident, ended_at)}
            app.send_task(TASK_DELIVER_CALLBACK, kwargs=kwargs, queue=QUEUE_CALLBACKS)
            sent += 1
        client.zrem(ENDED_KEY, job_id)
    return sent


def announce_stale(client: redis.Redis, app: Celery, now: float | None = None, limit: int = 500) -> int:
    """The sweeper's part: announce ends left in ENDED_KEY by a process that died."""
    cutoff = (time.time() if now is None else now) - STALE_SECONDS
    ids = client.zrangebyscore(ENDED_KEY, "-inf", cutoff, start=0, num=limit)
    if not ids:
        return 0
    found = [as_str(i) for i in ids]  # type: ignore[arg-type]
    log.info("announcing %d job end(s) a dead process left behind", len(found))
    return announce(client, app, found)
