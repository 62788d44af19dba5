"""Staged bytes nobody needs any more: job folders (and their block MD5s) of jobs that are
done, canceled or gone. The sweeper calls this every ORPHAN_EVERY_PASSES passes."""

from __future__ import annotations

import time
from pathlib import Path

import redis

from producers import staging
from producers.block_digests import SUFFIX as SIDECAR_SUFFIX
from producers.contract import JobState
from producers.job_ids import is_job_id
from producers.keys import job_key

ORPHAN_AGE_SECONDS = 3600.0
BATCH = 500


def remove_orphan_staging(client: redis.Redis, root: Path, min_age: float = ORPHAN_AGE_SECONDS) -> int:
    """Remove job folders in staging (and their block MD5s) whose job is done, or whose record
    is gone (expired or purged). Failed and dead jobs keep their bytes for `awork-uploads dead retry`.

    Only folders older than `min_age`: a producer stages the bytes just before it writes the
    record, and that moment must not look like an orphan.
    """
    if not root.is_dir():
        return 0
    cutoff = time.time() - min_age
    found: set[str] = set()
    for child in root.iterdir():
        # a job's folder, or its block MD5s (producers.block_digests) left without one
        job_id = child.name.removesuffix(SIDECAR_SUFFIX) if child.is_file() else child.name
        ours = child.is_dir() or child.name.endswith(SIDECAR_SUFFIX)
        if ours and is_job_id(job_id) and child.stat(follow_symlinks=False).st_mtime <= cutoff:
            found.add(job_id)
    candidates = sorted(found)
    removed = 0
    for i in range(0, len(candidates), BATCH):
        chunk = candidates[i : i + BATCH]
        pipe = client.pipeline(transaction=False)
        for job_id in chunk:
            pipe.hget(job_key(job_id), "state")
        for job_id, state in zip(chunk, pipe.execute(), strict=True):
            if state is None or _s(state) in (JobState.DONE.value, JobState.CANCELED.value):
                staging.remove_job_dir(root, job_id)
                removed += 1
    return removed


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
