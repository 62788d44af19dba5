"""POST /v1/jobs, GET /v1/jobs/{id}, GET /v1/jobs, POST /v1/jobs/{id}/cancel."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from producers import staging, text_rules
from producers.api_tokens import AUTH_SCRIPT, TokenInfo, auth_answer, auth_call
from producers.cancel import CancelRefused
from producers.client import JobNotFound, PublishFailed, Uploads
from producers.contract import JobState, SpecError
from producers.intake.auth import Auth, checked, presented_token, require_workspace
from producers.intake.body import body_to_staging, multipart_to_staging
from producers.intake.problems import Problem, invalid_request
from producers.intake.schemas import (
    JOB_ID_PATTERN,
    Cursor,
    JobList,
    JobOut,
    Limit,
    NewJob,
    problem_responses,
)
from producers.intake.settings import IntakeSettings
from producers.job_ids import is_job_id
from producers.keys import job_key
from producers.listing import list_jobs
from producers.records import Job
from producers.spec import JobSpec

router = APIRouter(prefix="/v1")
# Fields of an octet-stream upload: query parameters, or headers X-Awork-<Field>.
BODY_FIELDS = (
    "to",
    "workspace",
    "name",
    "description",
    "content_type",
    "callback_url",
    "priority",
    "on_existing",
    "new_version_of",
    "via",
)
NEW_JOB_BODY: dict[str, Any] = {
    "required": True,
    "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/NewJob"}},
        "application/octet-stream": {
            "schema": {"type": "string", "format": "binary"},
        },
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file", "to"],
                "properties": {
                    "file": {"type": "string", "format": "binary"},
                    **{f: {"type": "string"} for f in BODY_FIELDS},
                },
            }
        },
    },
}
OCTET_PARAMS: list[dict[str, Any]] = [
    {
        "name": f,
        "in": "query",
        "required": False,
        "schema": {"type": "string"},
        "description": "with an application/octet-stream body (or the header "
        f"X-Awork-{f.replace('_', '-').title()})",
    }
    for f in BODY_FIELDS
]


def _uploads(request: Request) -> Uploads:
    uploads: Uploads = request.app.state.uploads
    return uploads


def _settings(request: Request) -> IntakeSettings:
    settings: IntakeSettings = request.app.state.settings
    return settings


def job_out(job: Job) -> dict[str, Any]:
    return job.to_json()


def check_id(value: str, field: str = "id") -> str:
    if not is_job_id(value):
        raise Problem(
            400, "malformed-id", f"{field}: malformed id {value[:80]!r}: expected 32 hex digits", field
        )
    return value


def _octet_fields(request: Request) -> dict[str, str]:
    out: dict[str, str] = {}
    for f in BODY_FIELDS:
        value = request.query_params.get(f)
        if value is None:
            value = request.headers.get(f"x-awork-{f.replace('_', '-')}")
        if value is not None:
            out[f] = value
    return out


@router.post(
    "/jobs",
    status_code=202,
    response_model=JobOut,
    responses={
        200: {"model": JobOut, "description": "an Idempotency-Key replay: the earlier job"},
        **problem_responses(400, 401, 403, 413, 415, 422, 429, 503),
    },
    openapi_extra={"requestBody": NEW_JOB_BODY, "parameters": OCTET_PARAMS},
    summary="Enqueue one job: a source URL (JSON), the file itself (octet-stream), or multipart",
)
async def create_job(request: Request, token: Auth) -> JSONResponse:
    shared = _settings(request).shared
    source, fields, streamed = await _read_new_job(request, token)
    try:
        _precheck(token, fields)
        spec = _job_spec(source, fields, request.headers.get("idempotency-key"))
        (job,) = await run_in_threadpool(_uploads(request).enqueue_many, [spec], signer=token.id)
    except BaseException as exc:
        if streamed is not None and not _enqueued_anyway(exc, streamed.job_id):
            staging.remove_job_dir(shared.staging_dir, streamed.job_id)
        if isinstance(exc, SpecError):
            raise _spec_problem(exc) from None
        raise
    if streamed is not None and job.id != streamed.job_id:  # an idempotent replay: not needed
        staging.remove_job_dir(shared.staging_dir, streamed.job_id)
    status = 202 if job.created else 200
    return JSONResponse(job_out(job), status, headers={"Location": f"/v1/jobs/{job.id}"})


async def _read_new_job(
    request: Request, token: TokenInfo
) -> tuple[Any, dict[str, Any], staging.StreamedBody | None]:
    """(the source, the job's fields, the body staged when it carried the file) of a JSON,
    octet-stream or multipart request; a streamed body is checked (`_precheck`) before it is read."""
    settings = _settings(request)
    shared = settings.shared
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "application/json":
        try:
            model = NewJob.model_validate_json(await request.body())
        except ValidationError as exc:
            raise invalid_request(exc.errors()) from None
        return model.source_url, model.model_dump(), None
    if kind == "application/octet-stream":
        fields = _octet_fields(request)
        _precheck(token, fields)
        streamed = await body_to_staging(
            request.stream(),
            shared.staging_dir,
            fields.get("name") or "upload",
            settings.max_body_bytes,
            shared.staging_mode,
        )
        return streamed, fields, streamed
    if kind == "multipart/form-data":
        staged, form, filename = await multipart_to_staging(
            request.stream(),
            request.headers["content-type"],
            shared.staging_dir,
            settings.max_body_bytes,
            shared.staging_mode,
        )
        if staged is None:
            raise Problem(422, "missing-file", "file: a multipart upload needs a `file` part", "file")
        if filename and not form.get("name"):
            form["name"] = filename
        return staged, form, staged
    raise Problem(
        415,
        "unsupported-media-type",
        "content-type: expected application/json, application/octet-stream or multipart/form-data",
        "content-type",
    )


def _job_spec(source: Any, fields: dict[str, Any], idempotency_key: str | None) -> JobSpec:
    return JobSpec(
        source,
        to=fields["to"],
        workspace=fields.get("workspace") or "default",
        name=fields.get("name"),
        description=fields.get("description"),
        idempotency_key=idempotency_key,
        content_type=fields.get("content_type"),
        callback_url=fields.get("callback_url"),
        priority=fields.get("priority") or "normal",
        on_existing=fields.get("on_existing") or "new",
        new_version_of=fields.get("new_version_of"),
        via=fields.get("via") or "workers",
    )


def _precheck(token: TokenInfo, fields: dict[str, Any]) -> None:
    """What can be refused before a body is read: a missing target, a workspace outside the
    token, a file name the job contract refuses."""
    if not fields.get("to"):
        raise Problem(422, "invalid-field", "to: required (KIND:ID)", "to")
    require_workspace(token, fields.get("workspace") or "default")
    if fields.get("name") is not None:
        try:
            text_rules.file_name(fields["name"])
        except SpecError as exc:
            raise Problem.from_spec(exc) from None


def _enqueued_anyway(exc: BaseException, job_id: str) -> bool:
    return isinstance(exc, PublishFailed) and job_id in (exc.published_ids + exc.pending_ids)


def _spec_problem(exc: SpecError) -> Problem:
    if exc.field == "path":  # the body stands where a local file would: name it so
        return Problem(422, "invalid-field", f"body: {exc.message}", "body")
    return Problem.from_spec(exc)


@router.get(
    "/jobs/{job_id}",
    response_model=JobOut,
    responses=problem_responses(400, 401, 404, 429, 503),
    summary="One job",
)
async def get_job(request: Request, job_id: str) -> JSONResponse:
    """The hot path of polling clients: the token check and the read in one pipelined round
    trip on the async Redis client (no thread pool); the record is used only if the token is."""
    presented = presented_token(request)
    call = auth_call(presented)
    if call is None:
        checked(None)
    assert call is not None
    check_id(job_id)
    keys, args = call
    pipe = request.app.state.aredis.pipeline(transaction=False)
    pipe.eval(AUTH_SCRIPT, len(keys), *keys, *args)
    pipe.hgetall(job_key(job_id))
    got, record = await pipe.execute()
    token = checked(auth_answer(keys, got))
    if not record or record.get("workspace") not in token.workspaces:
        raise _job_not_found(job_id)
    return JSONResponse(job_out(Job.from_record(record)))


def _visible(request: Request, token: TokenInfo, job_id: str) -> Job:
    """The job, if it exists and belongs to one of the token's workspaces (else 404: the
    existence of other workspaces' jobs is not revealed)."""
    try:
        job = _uploads(request).status(job_id)
    except JobNotFound:
        raise _job_not_found(job_id) from None
    if job.workspace not in token.workspaces:
        raise _job_not_found(job_id)
    return job


def _job_not_found(job_id: str) -> Problem:
    return Problem(404, "job-not-found", f"id: no job {job_id} (unknown, or its record expired)", "id")


@router.get(
    "/jobs",
    response_model=JobList,
    responses=problem_responses(400, 401, 403, 429, 503),
    summary="Jobs, newest first (or a batch's, in request order), page by page",
)
def get_jobs(
    request: Request,
    token: Auth,
    state: Annotated[JobState | None, Query()] = None,
    workspace: Annotated[str | None, Query(max_length=64)] = None,
    batch: Annotated[str | None, Query(pattern=JOB_ID_PATTERN)] = None,
    limit: Limit = 100,
    cursor: Cursor = 0,
) -> dict[str, Any]:
    if workspace is not None:
        require_workspace(token, workspace)
    up = _uploads(request)
    page = list_jobs(
        up.redis,
        up.store,
        state=state.value if state else None,
        workspaces={workspace} if workspace else set(token.workspaces),
        batch_id=batch,
        limit=limit,
        cursor=cursor,
    )
    return {"jobs": [job_out(j) for j in page.jobs], "next_cursor": page.next_cursor}


@router.post(
    "/jobs/{job_id}/cancel",
    response_model=JobOut,
    responses={
        202: {"model": JobOut, "description": "a step runs: it stops at its next block or fence"},
        **problem_responses(400, 401, 404, 409, 429, 503),
    },
    summary="Cancel a job that is not linked yet",
)
def cancel_job(request: Request, job_id: str, token: Auth) -> JSONResponse:
    check_id(job_id)
    _visible(request, token, job_id)
    try:
        (job,) = _uploads(request).cancel([job_id])
    except JobNotFound:
        raise Problem(404, "job-not-found", f"id: no job {job_id}", "id") from None
    except CancelRefused as exc:
        code = "job-linked" if exc.reason == "linked" else "job-ended"
        raise Problem(409, code, f"id: {exc}", "id") from None
    return JSONResponse(job_out(job), 200 if job.state is JobState.CANCELED else 202)
