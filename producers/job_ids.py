"""The one job-id format, checked wherever an id comes from outside.

Producers make ids with `uuid.uuid4().hex`: 32 lowercase hex digits. An id names a Redis key and
a folder under STAGING_DIR, so an id from a command line, a record, the dead-letter set, a queue
or a task argument is checked against this format before it is used for either: `../x` or
`/abs` must never reach a path join (`Path(root) / "/abs"` is `/abs`).
"""

from __future__ import annotations

import re
import uuid

from producers.contract import SpecError

JOB_ID = re.compile(r"[0-9a-f]{32}")


def new_job_id() -> str:
    return uuid.uuid4().hex


def is_job_id(value: object) -> bool:
    return isinstance(value, str) and JOB_ID.fullmatch(value) is not None


def check_job_id(value: object, field: str = "job") -> str:
    """`value` when it is a job id, else SpecError naming `field`."""
    if not is_job_id(value):
        raise SpecError(field, f"malformed job id {value!r} (32 lowercase hex digits expected)")
    assert isinstance(value, str)
    return value
