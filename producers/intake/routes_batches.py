"""POST /v1/batches and GET /v1/batches/{id}."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from producers.client import Batch, JobNotFound, Uploads
from producers.contract import SpecError
from producers.intake.auth import Auth, require_workspace
from producers.intake.problems import Problem, invalid_request
from producers.intake.routes_jobs import check_id
from producers.intake.schemas import BatchCreated, BatchOut, Cursor, Limit, NewBatch, problem_responses
from producers.safe_open import FileRefused, open_beneath
from producers.spec import JobSpec

router = APIRouter(prefix="/v1")


@router.post(
    "/batches",
    status_code=202,
    response_model=BatchCreated,
    responses={
        200: {"model": BatchCreated, "description": "an Idempotency-Key replay: the earlier batch"},
        **problem_responses(400, 401, 403, 415, 422, 429, 503),
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/NewBatch"}}},
        }
    },
    summary="Enqueue many jobs (URL sources or files already in STAGING_DIR) in one request",
)
async def create_batch(request: Request, token: Auth) -> JSONResponse:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise Problem(
            415, "unsupported-media-type", "content-type: expected application/json", "content-type"
        )
    try:
        model = NewBatch.model_validate_json(await request.body())
    except ValidationError as exc:
        raise invalid_request(exc.errors()) from None
    up: Uploads = request.app.state.uploads
    specs = []
    for i, j in enumerate(model.jobs):
        workspace = j.workspace or model.workspace
        require_workspace(token, workspace, f"jobs[{i}].workspace")
        specs.append(
            JobSpec(
                _source(up, i, j.source_url, j.staged_path),
                to=j.to,
                workspace=workspace,
                name=j.name,
                description=j.description,
                content_type=j.content_type,
                callback_url=j.callback_url,
                priority=j.priority,
                on_existing=j.on_existing,
                new_version_of=j.new_version_of,
                via=j.via,
            )
        )
    idem = request.headers.get("idempotency-key")
    try:
        batch: Batch = await run_in_threadpool(
            up.enqueue_batch,
            specs,
            callback_url=model.callback_url,
            idempotency_key=idem,
            signer=token.id,
            owner=token.id,
        )
    except SpecError as exc:
        raise Problem.from_spec(exc) from None
    body = {
        "id": batch.id,
        "total": len(batch.jobs),
        "created": batch.created,
        "job_ids": [j.id for j in batch.jobs],
    }
    return JSONResponse(body, 202 if batch.created else 200, headers={"Location": f"/v1/batches/{batch.id}"})


def _source(up: Uploads, i: int, url: str | None, staged: str | None) -> str | Path:
    if (url is None) == (staged is None):
        raise Problem(
            422,
            "invalid-field",
            f"jobs[{i}]: give exactly one of source_url and staged_path",
            f"jobs[{i}].source_url",
        )
    if url is not None:
        if not url.lower().startswith(("http://", "https://")):
            raise Problem(
                422,
                "invalid-field",
                f"jobs[{i}].source_url: expected an http(s) URL",
                f"jobs[{i}].source_url",
            )
        return url
    assert staged is not None
    field = f"jobs[{i}].staged_path"
    root = up.settings.staging_dir
    if staged.startswith("/") or "\0" in staged:
        raise Problem(422, "invalid-field", f"{field}: a path relative to STAGING_DIR", field)
    path = root / staged
    try:  # inside STAGING_DIR, no symlink on the way, a regular file with one link
        open_beneath(root, path).close()
    except FileRefused as exc:
        raise Problem(422, "invalid-field", f"{field}: {exc.reason}", field) from None
    return path


@router.get(
    "/batches/{batch_id}",
    response_model=BatchOut,
    responses=problem_responses(400, 401, 404, 429, 503),
    summary="A batch: counts by state, and its jobs page by page",
)
def get_batch(
    request: Request,
    batch_id: str,
    token: Auth,
    limit: Limit = 100,
    cursor: Cursor = 0,
) -> dict[str, Any]:
    check_id(batch_id)
    up: Uploads = request.app.state.uploads
    try:
        page = up.batch(batch_id, cursor, limit)
    except JobNotFound:
        page = None
    if page is None or page.owner != token.id:  # another token's batch is not found either
        raise Problem(404, "batch-not-found", f"id: no batch {batch_id}", "id")
    return {**page.to_json(), "created": True}
