"""The job record, typed: one Redis hash per job (producers.keys.job_key), as a dataclass.

`Field` names every field the producers and workers write; code reads and writes them through
it, not through string literals. `JobRecord.decode` reads a hash as redis-py returns it (bytes
or str): a record is input (anyone with Redis access can write one), so an unknown field is
ignored and a known field that does not parse raises `RecordError` naming it, never a KeyError.
`encode` writes the hash's strings in the same forms the workers do ("" for none, "1"/"0",
repr of a float), so records written before and after read the same.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from producers.contract import FINISHED_STATES, STEP_TASKS, JobState
from producers.records import Job, JobError

log = logging.getLogger("awork.records")


class Field(StrEnum):
    """A field of the job record (its name in the Redis hash)."""

    # What the producer wrote (producers.client, producers.recurring)
    ID = "id"
    STATE = "state"
    WORKSPACE = "workspace"
    TARGET = "target"
    TARGET_KIND = "target_kind"
    ENTITY = "entity"
    ENTITY_ID = "entity_id"
    ROUTE = "route"
    FILE_NAME = "file_name"
    DESCRIPTION = "description"
    CONTENT_TYPE = "content_type"
    SIZE = "size"
    SOURCE_KIND = "source_kind"
    SOURCE = "source"
    STAGED_OWNED = "staged_owned"
    SOURCE_MD5 = "source_md5"
    IDEMPOTENCY_KEY = "idempotency_key"
    PRIORITY = "priority"
    PUBLISHED = "published"
    CREATED_AT = "created_at"
    UPDATED_AT = "updated_at"
    ON_EXISTING = "on_existing"
    NEW_VERSION_OF = "new_version_of"
    VIA = "via"
    FLOW = "flow"
    CALLBACK_URL = "callback_url"
    ON_DONE = "on_done"
    SIGNER = "signer"
    BATCH_ID = "batch_id"
    NOTIFY = "notify"
    # What the steps write (workers.step_runner, workers.steps, ...)
    RUNNING = "running"
    HEARTBEAT_AT = "heartbeat_at"
    BYTES_SENT = "bytes_sent"
    BYTES_TOTAL = "bytes_total"
    UPLOAD_ID = "upload_id"
    UPLOAD_URL = "upload_url"  # a write credential: never shown, removed when the job ends
    UPLOAD_URL_EXPIRES = "upload_url_expires"
    UPLOAD_URL_ISSUED_AT = "upload_url_issued_at"
    UPLOADED_UPLOAD_ID = "uploaded_upload_id"
    LINK_SENT_FOR = "link_sent_for"
    LINK_STARTED_AT = "link_started_at"
    MULTIPART_SENT = "multipart_sent"
    VERSION_SENT = "version_sent"
    BYURL_SENT = "byurl_sent"
    VERSION_OF = "version_of"
    VERSION_BEFORE = "version_before"
    VERSION_ID = "version_id"
    FILE_ID = "file_id"
    SIZE_VERIFIED = "size_verified"
    OUTCOME = "outcome"
    FINISHED_AT = "finished_at"
    WAIT_REASON = "wait_reason"
    WAIT_UNTIL = "wait_until"
    NAME_OWNER = "name_owner"
    CANCEL_REQUESTED = "cancel_requested"
    ERROR_STEP = "error_step"
    ERROR_CODE = "error_code"
    ERROR_DESCRIPTION = "error_description"
    ERROR_STATUS = "error_status"
    ERROR_TRACE_ID = "error_trace_id"
    # Counters
    RATE_CONTENDED = "rate_contended"
    RATE_WAITS = "rate_waits"
    RATE_LIMITED = "rate_limited"
    CONNECTION_WAITS = "connection_waits"
    NAME_WAITS = "name_waits"
    URL_RENEWALS = "url_renewals"
    RECONCILED = "reconciled"
    REDRIVES = "redrives"
    # The sweeper's re-drives and the callback deliveries
    REDRIVEN_AT = "redriven_at"
    REDRIVE_REASON = "redrive_reason"
    CALLBACK_STATE = "callback_state"
    CALLBACK_ATTEMPTS = "callback_attempts"
    CALLBACK_ERROR = "callback_error"


# Per-step counters: `<prefix>_<step>` for every step in producers.contract.STEP_TASKS.
STEP_COUNTERS = ("attempts", "errors", "crashes")


def step_field(counter: str, step: str) -> str:
    """The record field of a per-step counter: attempts_put, errors_link, crashes_generate..."""
    if counter not in STEP_COUNTERS or step not in STEP_TASKS:
        raise ValueError(f"no step counter {counter!r} for step {step!r}")
    return f"{counter}_{step}"


class RecordError(ValueError):
    """A record field that does not parse; `field` names it."""

    def __init__(self, job_id: str, name: str, problem: str) -> None:
        self.job_id, self.field = job_id, name
        super().__init__(f"job {job_id}: record field {name}: {problem}")


@dataclass
class JobRecord:
    """A job record, typed. None stands for a field that is absent (or empty) in the hash."""

    id: str
    state: JobState = JobState.QUEUED
    workspace: str = ""
    target: str = ""
    target_kind: str | None = None
    entity: str | None = None
    entity_id: str | None = None
    route: str | None = None
    file_name: str = ""
    description: str | None = None
    content_type: str | None = None
    size: int | None = None
    source_kind: str | None = None
    source: str | None = None
    staged_owned: bool = False
    source_md5: str | None = None
    idempotency_key: str | None = None
    priority: str = "normal"
    published: bool = False
    created_at: float = 0.0
    updated_at: float = 0.0
    on_existing: str | None = None
    new_version_of: str | None = None
    via: str | None = None
    flow: str | None = None
    callback_url: str | None = None
    on_done: str | None = None
    signer: str | None = None
    batch_id: str | None = None
    notify: bool = False
    running: str | None = None
    heartbeat_at: float | None = None
    bytes_sent: int = 0
    bytes_total: int | None = None
    upload_id: str | None = None
    upload_url: str | None = field(default=None, repr=False)
    upload_url_expires: float | None = None
    upload_url_issued_at: float | None = None
    uploaded_upload_id: str | None = None
    link_sent_for: str | None = None
    link_started_at: float | None = None
    multipart_sent: bool = False
    version_sent: bool = False
    byurl_sent: bool = False
    version_of: str | None = None
    version_before: int | None = None
    version_id: str | None = None
    file_id: str | None = None
    size_verified: bool = False
    outcome: str | None = None
    finished_at: float | None = None
    wait_reason: str | None = None
    wait_until: float | None = None
    name_owner: str | None = None
    cancel_requested: bool = False
    error_step: str | None = None
    error_code: str | None = None
    error_description: str | None = None
    error_status: int | None = None
    error_trace_id: str | None = None
    rate_contended: int = 0
    rate_waits: int = 0
    rate_limited: int = 0
    connection_waits: int = 0
    name_waits: int = 0
    url_renewals: int = 0
    reconciled: int = 0
    redrives: int = 0
    redriven_at: float | None = None
    redrive_reason: str | None = None
    callback_state: str | None = None
    callback_attempts: int = 0
    callback_error: str | None = None
    attempts: dict[str, int] = field(default_factory=dict)  # step -> attempts_<step>
    errors: dict[str, int] = field(default_factory=dict)  # step -> errors_<step>
    crashes: dict[str, int] = field(default_factory=dict)  # step -> crashes_<step>

    @property
    def finished(self) -> bool:
        return self.state in FINISHED_STATES

    @classmethod
    def decode(cls, raw: Mapping[Any, Any], job_id: str | None = None) -> JobRecord:
        """The record from a Redis hash (bytes or str keys and values). `job_id` is the id its
        key names: a record whose `id` field says otherwise (or none) is refused."""
        where = job_id or "?"
        try:
            text = {
                (k.decode() if isinstance(k, bytes) else str(k)): (
                    v.decode() if isinstance(v, bytes) else str(v)
                )
                for k, v in raw.items()
            }
        except UnicodeDecodeError:
            raise RecordError(where, "?", "not UTF-8") from None
        ident = text.get("id", "")
        if not ident:
            raise RecordError(where, Field.ID, "missing")
        if job_id is not None and ident != job_id:
            raise RecordError(job_id, Field.ID, f"names another job ({ident[:40]!r})")
        values: dict[str, Any] = {counter: {} for counter in STEP_COUNTERS}
        for name, value in text.items():
            if value == "":
                continue  # no value
            kind = _KINDS.get(name)
            if kind is not None:
                values[name] = value if kind == "str" else _parse(ident, name, kind, value)
                continue
            per_step = _STEP_FIELDS.get(name)
            if per_step is not None:
                values[per_step[0]][per_step[1]] = _parse(ident, name, "int", value)
        return cls(**values)
        return cls(**values)
        return cls(**values)

    def encode(self) -> dict[str, str]:
        """The hash's fields as strings; fields that are None are left out."""
        out: dict[str, str] = {}
        for name in _KINDS:
            value = getattr(self, name)
            if value is not None:
                out[name] = _encode(value)
        for counter in STEP_COUNTERS:
            for step, n in getattr(self, counter).items():
                out[step_field(counter, step)] = str(n)
        return out

    def job(self, created: bool = True) -> Job:
        """The public view of the record (GET /v1/jobs, `awork-uploads status`)."""
        error = None
        if self.error_code or self.error_description:
            error = JobError(
                step=self.error_step,
                code=self.error_code,
                description=self.error_description,
                status=self.error_status,
                trace_id=self.error_trace_id,
            )
        return Job(
            id=self.id,
            state=self.state,
            workspace=self.workspace,
            target=self.target,
            file_name=self.file_name,
            size=self.size,
            bytes_sent=self.bytes_sent,
            file_id=self.file_id,
            upload_id=self.upload_id,
            error=error,
            created_at=self.created_at,
            updated_at=self.updated_at,
            finished_at=self.finished_at,
            wait_reason=self.wait_reason,
            wait_until=self.wait_until,
            attempts={step: self.attempts.get(step, 0) for step in STEP_TASKS},
            priority=self.priority,
            created=created,
            outcome=self.outcome,
            batch_id=self.batch_id,
            cancel_requested=self.cancel_requested,
        )


def read(job_id: str, raw: Mapping[Any, Any] | None) -> JobRecord | None:
    """The record of `job_id` from its hash, or None when there is none or it does not parse
    (logged, naming the field): one bad record must not break a listing of many."""
    if not raw:
        return None
    try:
        return JobRecord.decode(raw, job_id)
    except RecordError as exc:
        log.warning("skipped an unreadable record: %s", exc)
        return None


def _kind(annotation: str) -> str:
    """The codec of a dataclass field from its annotation (annotations are strings here)."""
    for kind in ("JobState", "bool", "int", "float"):
        if annotation.startswith(kind):
            return kind
    return "str"


# field -> codec, for every field but the per-step counters (Field names the same fields).
_KINDS: dict[str, str] = {
    f.name: _kind(str(f.type)) for f in dataclasses.fields(JobRecord) if f.name not in STEP_COUNTERS
}
# attempts_put -> ("attempts", "put"), for every counter and step.
_STEP_FIELDS: dict[str, tuple[str, str]] = {
    f"{counter}_{step}": (counter, step) for counter in STEP_COUNTERS for step in STEP_TASKS
}


def _parse(job_id: str, name: str, kind: str, value: str) -> Any:
    try:
        if kind == "JobState":
            return JobState(value)
        if kind == "bool":
            if value not in ("0", "1"):
                raise ValueError(value)
            return value == "1"
        if kind == "int":
            try:
                return int(value)
            except ValueError:
                number = float(value)  # "12.0": how a float written by older code reads back
                if not number.is_integer():
                    raise
                return int(number)
        if kind == "float":
            number = float(value)
            if number != number or number in (float("inf"), float("-inf")):
                raise ValueError(value)
            return number
    except (ValueError, OverflowError):
        raise RecordError(job_id, name, f"expected {kind}, got {value[:40]!r}") from None
    return value


def _encode(value: object) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, StrEnum):
        return value.value
    if isinstance(value, float):
        return repr(value)
    return str(value)
