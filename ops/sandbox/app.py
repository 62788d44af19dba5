"""awork's file API under /api/v1: the routes of the contract the pipeline uses, strictly.

Routes are registered one per concrete contract path (e.g. `/tasks/{taskId}/files/byuploadid`),
so the test that compares the router with awork-openapi-files.json compares real entries.
Paths match case-insensitively, as awork's do (`generateUploadURL`, `byUploadId`).

Per request: trace id -> auth (401) -> workspace rate limit (429) -> no such path (404) ->
injected latency and faults -> handler. Errors are awork's JSON body; every response carries
Trace-Id, and every response to an authenticated request carries Kong's rate-limit headers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
import uuid
from typing import Any, NoReturn

from aiohttp import web

from . import errors as E
from .auth import workspace_for_key
from .core import UPLOAD_CONTAINER, Sandbox
from .errors import ApiError
from .faults import Fault
from .oauth import AUTHORIZE_PATH, TOKEN_PATH, OAuthError
from .receive import keep_received, receive_multipart
from .recurring import add_recurring_routes
from .routing import (
    API_PREFIX,
    ApiRoute,
    ApiRouter,
    Ctx,
    Handler,
    abort_connection,
    file_of,
    guess_mime,
    json_response,
    page_params,
    paged_response,
    read_json,
    require_entity,
    route_guid,
)
from .sas import format_se
from .state import StoredFile, now_iso
from .storage import Dropped

log = logging.getLogger("ops.sandbox")

BYUPLOADID_ENTITIES: dict[str, str] = {
    "tasks": "taskId",
    "projects": "projectId",
    "documents": "documentId",
    "tasktemplates": "tasktemplateId",
}
MULTIPART_ENTITIES: dict[str, str] = {
    **BYUPLOADID_ENTITIES,
    "companies": "companyId",
    "users": "userId",
    "workspaces": "workspaceId",
    "projecttemplates": "projecttemplateId",
}
# The contract has no GET /companies/{companyId}/files.
LIST_ENTITIES = {k: v for k, v in MULTIPART_ENTITIES.items() if k != "companies"}
IMAGE_ENTITY_NAMES = frozenset(
    {"companies", "contactpersons", "projects", "projecttemplates", "users", "workspaces"}
)
# --- helpers ---------------------------------------------------------------------------------


def _is_image(head: bytes) -> bool:
    return (
        head.startswith(b"\x89PNG\r\n\x1a\n")
        or head.startswith(b"\xff\xd8\xff")
        or head.startswith((b"GIF87a", b"GIF89a"))
        or (head.startswith(b"RIFF") and head[8:12] == b"WEBP")
    )


def _parse_upload_form(body: Any) -> tuple[str, str, str | None]:
    """UploadByUploadIdForm: property names case-insensitive as in ASP.NET, nothing extra."""
    if not isinstance(body, dict):
        raise E.validation_failed([("$", "The request body must be a JSON object.")])
    fields = {k.lower(): (k, v) for k, v in body.items()}
    problems: list[tuple[str, str]] = []
    for key in fields:
        if key not in ("uploadid", "filename", "description"):
            problems.append((fields[key][0], "Unknown property: UploadByUploadIdForm has no such member."))
    values: dict[str, str | None] = {}
    for key, prop in (("uploadid", "uploadId"), ("filename", "fileName")):
        value = fields.get(key, (prop, None))[1]
        if value is None:
            problems.append((prop, f"The {prop} field is required."))
        elif not isinstance(value, str):
            problems.append((prop, f"The {prop} field must be a string."))
        elif not value.strip():
            problems.append((prop, f"The {prop} field must not be empty."))
        else:
            values[key] = value
    description = fields.get("description", ("description", None))[1]
    if description is not None and not isinstance(description, str):
        problems.append(("description", "The description field must be a string or null."))
    if problems:
        raise E.validation_failed(problems)
    return str(values["uploadid"]), str(values["filename"]), description


# --- handlers --------------------------------------------------------------------------------


async def generate_upload_url(ctx: Ctx, params: dict[str, str]) -> web.StreamResponse:
    sb = ctx.sandbox
    upload_id = os.urandom(16).hex()  # opaque, deliberately not GUID-shaped
    expires_at = float(math.ceil(time.time() + sb.settings.upload_url_lifetime_s))
    path = f"/{UPLOAD_CONTAINER}/{upload_id}"
    query = sb.signer.sign_query(path, sb.settings.upload_url_permissions, expires_at)
    sb.state.new_upload(upload_id, ctx.workspace, format_se(expires_at))
    return json_response({"uploadId": upload_id, "uploadURL": f"{sb.blob_base}{path}?{query}"})


async def _link(ctx: Ctx, entity: str, entity_id: str, image: bool) -> web.StreamResponse:
    sb = ctx.sandbox
    upload_id, file_name, description = _parse_upload_form(await read_json(ctx))
    counters = sb.state.counters
    counters.link_attempts[upload_id] += 1
    require_entity(ctx, entity, entity_id)
    up = sb.state.uploads.get(upload_id)
    if up is None or up.workspace != ctx.workspace:
        raise ApiError(
            400, E.INVALID_OPERATION, "The upload id is unknown.",
            details=[f"No upload with the id '{upload_id}' exists in this workspace."],
        )
    if up.content is None:
        raise ApiError(
            400, E.INVALID_OPERATION, "No file has been uploaded for this upload id.",
            details=[f"The blob of upload '{upload_id}' was never committed."],
        )
    if counters.links[upload_id] and not sb.settings.duplicate_on_relink:
        raise ApiError(
            400, E.DUPLICATION_VIOLATION, "A file was already created from this upload id.",
            details=[f"Upload '{upload_id}' is already linked."],
        )
    if image and not _is_image(up.content.head(16)):
        raise E.validation_failed([("file", "The uploaded file is not an image.")])
    file_id = str(uuid.uuid4())
    up.linked.update(up.content.parts)
    stored = StoredFile(
        id=file_id,
        workspace=ctx.workspace,
        entity=entity,
        entity_id=entity_id,
        image=image,
        name=file_name,
        file_name=file_name,
        description=description,
        content=up.content,
        mime_type=guess_mime(file_name, up.content_type),
        upload_id=upload_id,
        created_on=now_iso(),
        created_by=ctx.user_id,
        content_md5=up.content_md5,
    )
    sb.state.add_file(stored)
    counters.links[upload_id] += 1
    return json_response(stored.file_info())


def link_handler(entity: str, param: str) -> Handler:
    async def handler(ctx: Ctx, params: dict[str, str]) -> web.StreamResponse:
        return await _link(ctx, entity, route_guid(params[param]), image=False)

    return handler


def _image_entity(name: str) -> str:
    entity = name.lower()
    if entity not in IMAGE_ENTITY_NAMES:
        raise E.validation_failed(
            [("entityName", f"'{name}' has no profile image; one of "
              f"{', '.join(sorted(IMAGE_ENTITY_NAMES))}.")]
        )
    return entity


async def image_link(ctx: Ctx, params: dict[str, str]) -> web.StreamResponse:
    entity = _image_entity(params["entityName"])
    return await _link(ctx, entity, route_guid(params["entityId"]), image=True)


async def _multipart(ctx: Ctx, entity: str, entity_id: str, image: bool) -> web.StreamResponse:
    require_entity(ctx, entity, entity_id)
    got = await receive_multipart(ctx)
    if image and not _is_image(got.sink.head):
        got.sink.path.unlink()
        raise E.validation_failed([("file", "The uploaded file is not an image.")])
    file_id = str(uuid.uuid4())
    content = keep_received(ctx, got, file_id)
    display = got.form.get("name") or got.file_name
    stored = StoredFile(
        id=file_id,
        workspace=ctx.workspace,
        entity=entity,
        entity_id=entity_id,
        image=image,
        name=display,
        file_name=got.file_name,
        description=got.form.get("description"),
        content=content,
        mime_type=guess_mime(got.file_name, got.part_type),
        upload_id=None,
        created_on=now_iso(),
        created_by=ctx.user_id,
    )
    ctx.sandbox.state.add_file(stored)
    return json_response(stored.file_info())


def multipart_handler(entity: str, param: str) -> Handler:
    async def handler(ctx: Ctx, params: dict[str, str]) -> web.StreamResponse:
        return await _multipart(ctx, entity, route_guid(params[param]), image=False)

    return handler


async def image_multipart(ctx: Ctx, params: dict[str, str]) -> web.StreamResponse:
    entity = _image_entity(params["entityName"])
    return await _multipart(ctx, entity, route_guid(params["entityId"]), image=True)


def list_handler(entity: str, param: str) -> Handler:
    async def handler(ctx: Ctx, params: dict[str, str]) -> web.StreamResponse:
        entity_id = route_guid(params[param])
        page = page_params(ctx.request)
        require_entity(ctx, entity, entity_id)
        files = ctx.sandbox.state.files
        ids = ctx.sandbox.state.files_by_entity.get((entity, entity_id), [])
        return paged_response(ids, page, lambda i: files[i].file_info())

    return handler


def _download(f: StoredFile, inline: bool) -> web.StreamResponse:
    disposition = "inline" if inline else "attachment"
    quoted = f.file_name.replace("\\", "\\\\").replace('"', '\\"')
    return f.content.response({
        "Content-Type": f.mime_type,
        "Content-Disposition": f'{disposition}; filename="{quoted}"',
    })


async def download(ctx: Ctx, params: dict[str, str]) -> web.StreamResponse:
    f = file_of(ctx, params["fileId"], None, None)
    return _download(f, ctx.request.query.get("inline", "").lower() == "true")


def entity_download_handler(entity: str, param: str) -> Handler:
    async def handler(ctx: Ctx, params: dict[str, str]) -> web.StreamResponse:
        entity_id = route_guid(params[param])
        require_entity(ctx, entity, entity_id)
        f = file_of(ctx, params["fileId"], entity, entity_id)
        return _download(f, ctx.request.query.get("inline", "").lower() == "true")

    return handler


def metadata_handler(entity: str, param: str) -> Handler:
    async def handler(ctx: Ctx, params: dict[str, str]) -> web.StreamResponse:
        entity_id = route_guid(params[param])
        require_entity(ctx, entity, entity_id)
        return json_response(file_of(ctx, params["fileId"], entity, entity_id).file_info())

    return handler


async def image_get(ctx: Ctx, params: dict[str, str]) -> web.StreamResponse:
    entity = _image_entity(params["entityName"])
    entity_id = route_guid(params["entityId"])
    require_entity(ctx, entity, entity_id)
    file_id = ctx.sandbox.state.images.get((entity, entity_id))
    if file_id is None:
        raise E.not_found(f"The {entity} entity '{entity_id}' has no image.")
    return _download(ctx.sandbox.state.files[file_id], inline=True)


def build_router() -> ApiRouter:
    r = ApiRouter()
    r.add("POST", "/files/generateuploadurl", "/files/generateuploadurl", "generate",
          generate_upload_url)
    for entity, param in BYUPLOADID_ENTITIES.items():
        r.add("POST", f"/{entity}/{{{param}}}/files/byuploadid",
              "/{entity}/{id}/files/byuploadid", "link", link_handler(entity, param), entity)
    r.add("POST", "/files/images/{entityName}/{entityId}/byuploadid",
          "/files/images/{entityName}/{id}/byuploadid", "image_link", image_link)
    for entity, param in MULTIPART_ENTITIES.items():
        r.add("POST", f"/{entity}/{{{param}}}/files", "/{entity}/{id}/files", "multipart",
              multipart_handler(entity, param), entity)
        r.add("GET", f"/{entity}/{{{param}}}/files/{{fileId}}", "/{entity}/{id}/files/{fileId}",
              "list", metadata_handler(entity, param), entity)
        r.add("GET", f"/{entity}/{{{param}}}/files/{{fileId}}/download",
              "/{entity}/{id}/files/{fileId}/download", "download",
              entity_download_handler(entity, param), entity)
    for entity, param in LIST_ENTITIES.items():
        r.add("GET", f"/{entity}/{{{param}}}/files", "/{entity}/{id}/files", "list",
              list_handler(entity, param), entity)
    r.add("POST", "/files/images/{entityName}/{entityId}", "/files/images/{entityName}/{id}",
          "multipart", image_multipart)
    r.add("GET", "/files/images/{entityName}/{entityId}", "/files/images/{entityName}/{id}",
          "download", image_get)
    r.add("GET", "/files/{fileId}/download", "/files/{fileId}/download", "download", download)
    add_recurring_routes(r, MULTIPART_ENTITIES)
    return r


# --- dispatch --------------------------------------------------------------------------------


class _Answer(Exception):
    """A response that skips the route handlers (GET /me)."""

    def __init__(self, response: web.Response) -> None:
        super().__init__("answer")
        self.response = response


def _unrouted(
    method: str, sub_path: str, path_exists: bool, workspace: str, user_id: str
) -> NoReturn:
    """An authenticated request no route takes: GET /me, else 405 or 404."""
    if method == "GET" and sub_path.lower().rstrip("/") == "/me":
        # awork's GET /me (the current user): what `connections test` calls
        raise _Answer(json_response({"id": user_id, "workspace": workspace}))
    if path_exists:
        raise ApiError(
            405, E.METHOD_NOT_ALLOWED, f"The method {method} is not allowed for this URL."
        )
    raise E.NO_ROUTE


async def oauth_endpoint(
    sb: Sandbox, request: web.BaseRequest, path: str, headers: dict[str, str]
) -> web.StreamResponse:
    """/accounts/authorize and /accounts/token: no bearer token, no rate window (ops.sandbox.oauth)."""
    try:
        if path == AUTHORIZE_PATH and request.method == "GET":
            location = sb.oauth.authorize(dict(request.query))
            return web.Response(status=302, headers={**headers, "Location": location})
        if path == TOKEN_PATH and request.method == "POST":
            body = sb.oauth.token(request.headers.get("Authorization", ""), await request.read())
            return web.Response(
                body=json.dumps(body).encode(), content_type="application/json",
                headers={**headers, "Cache-Control": "no-store"},
            )
        raise OAuthError(405, "invalid_request", f"{request.method} is not allowed here")
    except OAuthError as exc:
        return web.Response(
            status=exc.status, body=json.dumps(exc.body()).encode(),
            content_type="application/json", headers=headers,
        )


class ApiFrontDoor:
    """Everything under /api/v1: auth, limits, faults, counters around the handlers."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        self.router = build_router()
        self._keys = sandbox.config.api_keys

    async def handle(self, request: web.BaseRequest, sub_path: str) -> web.StreamResponse:
        sb = self.sandbox
        counters = sb.state.counters
        trace_id = os.urandom(16).hex()
        counters.api_requests += 1
        method = request.method
        route, params, path_exists = self.router.match(method, sub_path or "/")
        stat = route.stat if route is not None else f"{method} {API_PREFIX}/<unmatched>"
        counters.requests[stat] += 1
        headers = {"Trace-Id": trace_id, "X-Edge-Ref": f"sandbox-{trace_id[:12]}"}
        if route is None and sub_path.lower().rstrip("/") in (AUTHORIZE_PATH, TOKEN_PATH):
            return await oauth_endpoint(sb, request, sub_path.lower().rstrip("/"), headers)
        try:
            workspace, user_id = self._admit(request, headers)
            if route is None:
                _unrouted(method, sub_path, path_exists, workspace, user_id)
            ctx = Ctx(sb, request, workspace, user_id, trace_id, sb.faults.decide(route.fault))
            response = await self._run(ctx, route, params, headers)
        except _Answer as answer:
            response = answer.response
        except ApiError as exc:
            response = web.Response(
                status=exc.status, body=exc.body(trace_id), content_type="application/json"
            )
            if exc.headers:
                headers.update(exc.headers)
        except (ConnectionError, asyncio.CancelledError):
            raise  # a drop (ours or the client's): nothing to answer
        except Exception as exc:  # a sandbox bug must still look like awork's 500
            log.exception("unhandled error in %s %s", method, request.path)
            response = web.Response(
                status=500, content_type="application/json",
                body=E.awork_error_body(E.SERVER_ERROR, f"Sandbox bug: {exc!r}", trace_id),
            )
        response.headers.update(headers)
        status = str(response.status)
        counters.statuses[status] += 1
        counters.statuses_by_route[stat][status] += 1
        return response

    def _admit(self, request: web.BaseRequest, headers: dict[str, str]) -> tuple[str, str]:
        """(workspace, user id) of a caller within its rate window; 401 or 429 otherwise.
        Every admitted request (and every 429) gets the rate-limit headers."""
        sb = self.sandbox
        counters = sb.state.counters
        caller = self._caller(request.headers.get("Authorization", ""))
        if caller is None:
            counters.unauthorized += 1
            headers["WWW-Authenticate"] = "Bearer"
            raise ApiError(
                401, E.UNAUTHORIZED,
                "The request is not authorized: missing or unknown bearer token.",
            )
        workspace, _ = caller
        counters.requests_by_workspace[workspace] += 1
        decision = sb.limiter.hit(workspace, time.time())
        headers.update(decision.headers)
        if not decision.allowed:
            counters.rate_limited += 1
            counters.rate_limited_by_workspace[workspace] += 1
            if sb.settings.retry_after_header:
                headers["Retry-After"] = str(decision.reset)
            raise ApiError(429, E.TOO_MANY_REQUESTS, "API rate limit exceeded.")
        return caller

    async def _run(
        self, ctx: Ctx, route: ApiRoute, params: dict[str, str], headers: dict[str, str]
    ) -> web.StreamResponse:
        """The route's handler with the decided fault around it: latency and faults that strike
        before it, then those that lose the answer after the work was done."""
        counters = self.sandbox.state.counters
        fault = ctx.fault
        if fault.delay_s > 0:
            counters.faults_injected["latency"] += 1
            await asyncio.sleep(fault.delay_s)
        fault_kind = fault.kind
        if fault_kind is not None:
            self._before(ctx.request, ctx.workspace, fault, headers)
        response = await route.handler(ctx, params)
        if fault_kind is not None:
            await self._after(ctx.request, fault_kind)
        return response

    def _caller(self, authorization: str) -> tuple[str, str] | None:
        """(workspace, user id) of a bearer API key (compared in constant time) or of a live
        OAuth access token; None for anything else."""
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer":
            return None
        token = token.strip()
        workspace = workspace_for_key(self._keys, token)
        if workspace is not None:
            return workspace, self.sandbox.user_ids[token]
        return self.sandbox.oauth.access(token)

    def _before(self, request: web.BaseRequest, workspace: str, fault: Fault,
                headers: dict[str, str]) -> None:
        """Faults that strike before the handler runs (drop mid-body is the handler's)."""
        counters = self.sandbox.state.counters
        kind = fault.kind
        if kind == "429":
            counters.faults_injected["429"] += 1
            rl_headers, reset = self.sandbox.limiter.exhausted_headers(workspace, time.time())
            headers.update(rl_headers)
            if self.sandbox.settings.retry_after_header:
                headers["Retry-After"] = str(reset)
            raise ApiError(429, E.TOO_MANY_REQUESTS, "API rate limit exceeded.")
        if kind == "503":
            counters.faults_injected["503"] += 1
            raise ApiError(503, E.SERVICE_UNAVAILABLE, "The service is temporarily unavailable.")
        if kind == "500":
            counters.faults_injected["500"] += 1
            raise ApiError(500, E.SERVER_ERROR, "An internal server error occurred.")
        if kind == "drop":
            counters.faults_injected["drop"] += 1
            # Requests with a body stream it in the handler and drop part-way through.
            if not (request.content_length and request.content_type.startswith("multipart/")):
                abort_connection(request)
                raise Dropped("sandbox fault: connection dropped")

    async def _after(self, request: web.BaseRequest, kind: str) -> None:
        """Faults that lose the answer after the handler did the work."""
        counters = self.sandbox.state.counters
        if kind == "drop_after":
            counters.faults_injected["drop_after"] += 1
            abort_connection(request)
            raise Dropped("sandbox fault: response dropped after the work was done")
        if kind == "stall_after":
            counters.faults_injected["stall_after"] += 1
            await asyncio.sleep(self.sandbox.settings.stall_after_s)
            abort_connection(request)
            raise Dropped("sandbox fault: answer held, then dropped, after the work was done")
        if kind == "500_after":
            counters.faults_injected["500_after"] += 1
            raise ApiError(500, E.SERVER_ERROR, "An internal server error occurred.")
