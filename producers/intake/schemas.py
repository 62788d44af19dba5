"""The API's models: what handlers read and answer, and what /openapi.json documents."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import Query
from pydantic import BaseModel, ConfigDict, Field

from producers.contract import JobState

State = Literal[
    "queued",
    "requesting_url",
    "uploading",
    "linking",
    "waiting_for_connection",
    "done",
    "failed",
    "dead",
    "canceled",
]
assert set(State.__args__) == {s.value for s in JobState}  # type: ignore[attr-defined]
JOB_ID_PATTERN = r"^[0-9a-f]{32}$"
# The paging query parameters of GET /v1/jobs and GET /v1/batches/{id}.
Limit = Annotated[int, Query(ge=1, le=1000)]
Cursor = Annotated[int, Query(ge=0, le=10**9)]


class JobErrorOut(BaseModel):
    step: str | None = None
    code: str | None = None
    description: str | None = None
    status: int | None = None
    trace_id: str | None = None


class JobOut(BaseModel):
    """A job as its record says (the source of truth for status)."""

    id: str
    state: State
    workspace: str
    target: str
    file_name: str
    size: int | None = None
    bytes_sent: int
    file_id: str | None = None
    upload_id: str | None = None
    error: JobErrorOut | None = None
    created_at: float
    updated_at: float
    finished_at: float | None = None
    wait_reason: str | None = None
    wait_until: float | None = None
    attempts: dict[str, int]
    created: bool = Field(description="false when the Idempotency-Key returned an earlier job")
    batch_id: str | None = None
    cancel_requested: bool = False
    priority: str = "normal"
    outcome: str | None = Field(
        None, description="a done job that made no new file: `version` (of file_id) or `skipped`"
    )


class JobList(BaseModel):
    jobs: list[JobOut]
    next_cursor: str | None = Field(None, description="pass as `cursor` for the next page; null at the end")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _JobOptions(_Strict):
    """How a job lands (producers.recurring) and where it queues among its workspace's jobs."""

    priority: Literal["high", "normal", "bulk"] = Field(
        "normal", description="order among this workspace's jobs; never more than its share"
    )
    on_existing: Literal["new", "version", "skip"] = Field(
        "new", description="a file of that name is there: add another, a new version of it, or skip"
    )
    new_version_of: str | None = Field(None, description="a new version of this awork file id")
    via: Literal["workers", "awork"] = Field(
        "workers", description="awork: awork fetches the (public, <= 100 MB) source URL itself"
    )


class NewJob(_JobOptions):
    """A job whose bytes are at an http(s) URL on the allow-list (AWORK_SOURCE_URL_HOSTS)."""

    to: str = Field(description="KIND:ID, e.g. task:<uuid>, image:projects/<uuid>, company:<uuid>")
    source_url: str
    workspace: str = "default"
    name: str | None = None
    description: str | None = None
    content_type: str | None = None
    callback_url: str | None = Field(
        None, description="POSTed (signed) when the job ends; AWORK_CALLBACK_HOSTS"
    )


class BatchJob(_JobOptions):
    """One job of a batch: a source URL, or a path relative to STAGING_DIR of a file already there."""

    to: str
    source_url: str | None = None
    staged_path: str | None = None
    workspace: str | None = Field(None, description="defaults to the batch's workspace")
    name: str | None = None
    description: str | None = None
    content_type: str | None = None
    callback_url: str | None = None


class NewBatch(_Strict):
    jobs: list[BatchJob] = Field(min_length=1, max_length=10_000)
    workspace: str = "default"
    callback_url: str | None = Field(None, description="POSTed once, when the batch's last job has ended")


class BatchCreated(BaseModel):
    """The answer to POST /v1/batches: the batch and its job ids in request order (the jobs
    themselves: GET /v1/batches/{id}, page by page)."""

    id: str
    total: int
    created: bool = Field(description="false when the Idempotency-Key returned an earlier batch")
    job_ids: list[str]


class BatchOut(BaseModel):
    id: str
    total: int
    open: int = Field(description="jobs not yet ended")
    counts: dict[str, int] = Field(description="jobs by state")
    created_at: float
    finished_at: float | None = None
    jobs: list[JobOut]
    next_cursor: str | None = None
    created: bool = True


class ProblemOut(BaseModel):
    """RFC 9457 problem details."""

    type: str
    title: str
    status: int
    detail: str
    field: str | None = Field(None, description="the request field at fault")


class Health(BaseModel):
    status: Literal["ok"]


class Ready(BaseModel):
    status: Literal["ready"]


PROBLEM = "application/problem+json"


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """Error answers for the OpenAPI document (app.py moves their schema to problem+json)."""
    return {s: {"model": ProblemOut, "description": "a problem (RFC 9457)"} for s in statuses}
