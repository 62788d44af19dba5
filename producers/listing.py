"""Listing jobs page by page: GET /v1/jobs and `Uploads.list_jobs`.

The job index (newest first) or a batch's job list is read in slices; each slice's records are
fetched in one pipeline and filtered (state, workspaces). The cursor is the position in that
list after the last job looked at, so a page that filtered many jobs out still ends, and the
next page goes on from there. Ids whose records have expired are skipped.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import redis

from producers.job_ids import is_job_id
from producers.job_record import read
from producers.keys import INDEX_KEY, batch_jobs_key
from producers.records import Job, JobStore

SLICE = 500
MAX_SCAN = 20_000  # ids looked at per page at most: a rare filter answers a short page and a cursor


@dataclass(frozen=True)
class JobPage:
    jobs: list[Job]
    next_cursor: str | None


def list_jobs(
    client: redis.Redis,
    store: JobStore,
    *,
    state: str | None = None,
    workspaces: Collection[str] | None = None,
    batch_id: str | None = None,
    limit: int = 100,
    cursor: int = 0,
) -> JobPage:
    key = batch_jobs_key(batch_id) if batch_id else INDEX_KEY
    newest_first = batch_id is None
    out: list[Job] = []
    pos = cursor
    scanned = 0
    while len(out) < limit and scanned < MAX_SCAN:
        raw = client.zrange(key, pos, pos + SLICE - 1, desc=newest_first)
        ids = [i.decode() if isinstance(i, bytes) else str(i) for i in raw]
        if not ids:
            return JobPage(out, None)
        wanted = [i for i in ids if is_job_id(i)]
        by_id = dict(zip(wanted, store.get_many(wanted), strict=True))
        for n, job_id in enumerate(ids):
            record = read(job_id, by_id.get(job_id))  # None: expired, or not a record we can read
            scanned += 1
            if record is None:
                continue
            if state is not None and record.state != state:
                continue
            if workspaces is not None and record.workspace not in workspaces:
                continue
            out.append(record.job())
            if len(out) >= limit:
                return JobPage(out, str(pos + n + 1))
        pos += len(ids)
    return JobPage(out, str(pos))
