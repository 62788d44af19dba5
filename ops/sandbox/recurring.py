"""The routes for recurring files: new versions of a file, and files awork fetches by URL.

`POST /{entity}/{id}/files/{fileId}/versions` (multipart, part `File`, up to the multipart cap)
adds a version and answers awork's FileVersion; `GET .../versions` lists them (paged).
`POST /{entity}/{id}/files/byurl` (FilePostForm `{url, name, description}`) fetches the URL and
stores it as a new file, up to `byurl_max_bytes` (awork: 100 MB). awork fetches public URLs;
the sandbox fetches from loopback test servers only, and refuses every other host, so it
never reaches out of the machine it runs on.
"""

from __future__ import annotations

import hashlib
import uuid
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import unquote, urlsplit

import aiohttp
from aiohttp import web

from workers.api_url import is_loopback_host

from . import errors as E
from . import routing
from .content import Content
from .errors import ApiError
from .receive import keep_received, receive_multipart
from .routing import ApiRouter, Ctx
from .state import StoredFile, now_iso

FETCH_TIMEOUT_S = 30.0
FETCH_CHUNK = 1 << 20
_FORM_FIELDS = ("url", "name", "description")


def add_recurring_routes(r: ApiRouter, entities: dict[str, str]) -> None:
    for entity, param in entities.items():
        r.add("POST", f"/{entity}/{{{param}}}/files/{{fileId}}/versions",
              "/{entity}/{id}/files/{fileId}/versions", "versions", _add_version(entity, param), entity)
        r.add("GET", f"/{entity}/{{{param}}}/files/{{fileId}}/versions",
              "/{entity}/{id}/files/{fileId}/versions", "list", _list_versions(entity, param), entity)
        r.add("POST", f"/{entity}/{{{param}}}/files/byurl", "/{entity}/{id}/files/byurl", "byurl",
              _by_url(entity, param), entity)


def _add_version(entity: str, param: str) -> Any:
    async def handler(ctx: Ctx, params: dict[str, str]) -> web.StreamResponse:
        entity_id = routing.route_guid(params[param])
        routing.require_entity(ctx, entity, entity_id)
        stored = routing.file_of(ctx, params["fileId"], entity, entity_id)
        got = await receive_multipart(ctx)
        content = keep_received(ctx, got, str(uuid.uuid4()))
        version = stored.add_version(content, ctx.user_id)
        return routing.json_response(version.info(stored.id))

    return handler


def _list_versions(entity: str, param: str) -> Any:
    async def handler(ctx: Ctx, params: dict[str, str]) -> web.StreamResponse:
        entity_id = routing.route_guid(params[param])
        page = routing.page_params(ctx.request)
        routing.require_entity(ctx, entity, entity_id)
        stored = routing.file_of(ctx, params["fileId"], entity, entity_id)
        return routing.paged_response(stored.versions, page, lambda v: v.info(stored.id))

    return handler


def _by_url(entity: str, param: str) -> Any:
    async def handler(ctx: Ctx, params: dict[str, str]) -> web.StreamResponse:
        entity_id = routing.route_guid(params[param])
        url, name, description = _parse_form(await routing.read_json(ctx))
        routing.require_entity(ctx, entity, entity_id)
        file_id = str(uuid.uuid4())
        path = ctx.sandbox.state.new_file_path(file_id)
        size, md5, mime = await _fetch(url, path, ctx.sandbox.settings.byurl_max_bytes)
        file_name = name or PurePosixPath(unquote(urlsplit(url).path)).name or "file"
        stored = StoredFile(
            id=file_id,
            workspace=ctx.workspace,
            entity=entity,
            entity_id=entity_id,
            image=False,
            name=file_name,
            file_name=file_name,
            description=description,
            content=Content((path,), size, md5),
            mime_type=routing.guess_mime(file_name, mime),
            upload_id=None,
            created_on=now_iso(),
            created_by=ctx.user_id,
        )
        ctx.sandbox.state.add_file(stored)
        ctx.sandbox.state.counters.byurl_fetches += 1
        return routing.json_response(stored.file_info())

    return handler


def _parse_form(body: Any) -> tuple[str, str | None, str | None]:
    """FilePostForm: case-insensitive property names, nothing extra, `url` required."""
    if not isinstance(body, dict):
        raise E.validation_failed([("$", "The request body must be a JSON object.")])
    fields = {k.lower(): (k, v) for k, v in body.items()}
    problems = [(orig, "Unknown property: FilePostForm has no such member.")
                for key, (orig, _) in fields.items() if key not in _FORM_FIELDS]
    values: dict[str, str | None] = {}
    for key in _FORM_FIELDS:
        value = fields.get(key, (key, None))[1]
        if value is not None and not isinstance(value, str):
            problems.append((key, f"The {key} field must be a string or null."))
        values[key] = value
    if not values["url"]:
        problems.append(("url", "The url field is required."))
    if problems:
        raise E.validation_failed(problems)
    return str(values["url"]), values["name"] or None, values["description"]


def _loopback_url(url: str) -> bool:
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or parts.username or parts.password:
        return False
    return is_loopback_host(host)


def _fetch_failed(why: str) -> ApiError:
    return ApiError(400, E.INVALID_OPERATION, "The file could not be downloaded from the url.",
                    details=[why])


async def _fetch(url: str, path: Any, cap: int) -> tuple[int, bytes, str | None]:
    """GET `url` into `path` (size, MD5, Content-Type); no redirects, at most `cap` bytes."""
    if not _loopback_url(url):
        raise _fetch_failed("The sandbox fetches from loopback test servers only.")
    too_large = ApiError(400, E.REQUEST_BODY_TOO_LARGE,
                         f"The file at the url is too large: at most {cap} bytes.")
    digest = hashlib.md5()
    size = 0
    timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT_S)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session, session.get(
            url, allow_redirects=False
        ) as resp:
            if resp.status != 200:
                raise _fetch_failed(f"The url answered {resp.status}.")
            if resp.content_length is not None and resp.content_length > cap:
                raise too_large
            with open(path, "wb") as out:
                async for chunk in resp.content.iter_chunked(FETCH_CHUNK):
                    size += len(chunk)
                    if size > cap:
                        raise too_large
                    digest.update(chunk)
                    out.write(chunk)
            mime = resp.headers.get("Content-Type")
    except (aiohttp.ClientError, TimeoutError) as exc:
        path.unlink(missing_ok=True)
        raise _fetch_failed(f"{type(exc).__name__}") from None
    except ApiError:
        path.unlink(missing_ok=True)
        raise
    if size == 0:
        path.unlink(missing_ok=True)
        raise _fetch_failed("The url answered no bytes.")
    return size, digest.digest(), mime
