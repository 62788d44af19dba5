"""The API's routing and the small helpers its handlers share (ops.sandbox.app's file routes
and ops.sandbox.recurring's version and by-URL routes): the request context, the router,
route ids, JSON bodies and answers, pages, and files looked up for the caller's workspace."""

from __future__ import annotations

import json
import mimetypes
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import web

from . import errors as E
from .core import Sandbox
from .errors import ApiError
from .faults import Fault
from .state import StoredFile

API_PREFIX = "/api/v1"
JSON_BODY_MAX = 1 << 20
_T = TypeVar("_T")
_UUID = re.compile(r"^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$")


@dataclass
class Ctx:
    """One authenticated API request."""

    sandbox: Sandbox
    request: web.BaseRequest
    workspace: str
    user_id: str
    trace_id: str
    fault: Fault


Handler = Callable[[Ctx, dict[str, str]], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class ApiRoute:
    method: str
    path: str  # as in the contract, below /api/v1
    stat: str  # the key in stats["requests"]
    fault: str  # the fault route name
    handler: Handler
    entity: str | None
    regex: re.Pattern[str]


def _compile(path: str) -> re.Pattern[str]:
    pattern = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(path))
    return re.compile(f"^{pattern}/?$", re.IGNORECASE)


class ApiRouter:
    def __init__(self) -> None:
        self.routes: list[ApiRoute] = []
        self._by_first: dict[str, list[ApiRoute]] = {}

    def add(
        self, method: str, path: str, stat: str, fault: str, handler: Handler,
        entity: str | None = None,
    ) -> None:
        route = ApiRoute(method, path, f"{method} {API_PREFIX}{stat}", fault, handler, entity,
                         _compile(path))
        self.routes.append(route)
        first = path.split("/")[1].lower()
        self._by_first.setdefault(first, []).append(route)

    def match(self, method: str, path: str) -> tuple[ApiRoute | None, dict[str, str], bool]:
        """(route, params, path_exists): path_exists tells 404 from a wrong method."""
        first = path.split("/", 2)[1].lower() if path.startswith("/") else ""
        exists = False
        for route in self._by_first.get(first, ()):
            m = route.regex.match(path)
            if m is None:
                continue
            if route.method == method:
                return route, m.groupdict(), True
            exists = True
        return None, {}, exists


def json_response(data: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=json.dumps(data).encode(), content_type="application/json", headers=headers
    )


def route_guid(value: str) -> str:
    """Route ids are GUIDs; anything else matches no route in awork (404)."""
    if not _UUID.match(value):
        raise E.NO_ROUTE
    return value.lower()


def require_entity(ctx: Ctx, entity: str, entity_id: str) -> None:
    if not ctx.sandbox.state.entity_visible(entity, entity_id, ctx.workspace):
        raise E.not_found(f"No {entity} entity with the id '{entity_id}' exists.")


def media_type(request: web.BaseRequest) -> str:
    return request.content_type.lower()


def _is_json_type(mt: str) -> bool:
    return mt == "application/json" or (mt.startswith("application/") and mt.endswith("+json"))


def guess_mime(file_name: str, declared: str | None) -> str:
    """The declared type unless it says nothing, else a guess from the name."""
    if declared and declared.lower() != "application/octet-stream":
        return declared
    return mimetypes.guess_type(file_name)[0] or declared or "application/octet-stream"


async def read_json(ctx: Ctx) -> Any:
    request = ctx.request
    if not _is_json_type(media_type(request)):
        raise ApiError(
            415, E.UNSUPPORTED_MEDIA_TYPE, "The request body must be application/json.",
        )
    if request.content_length is not None and request.content_length > JSON_BODY_MAX:
        raise ApiError(400, E.REQUEST_BODY_TOO_LARGE, "The request body is too large.")
    raw = await request.content.read(JSON_BODY_MAX + 1)
    if len(raw) > JSON_BODY_MAX:
        raise ApiError(400, E.REQUEST_BODY_TOO_LARGE, "The request body is too large.")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise E.validation_failed(
            [("$", "The JSON value could not be converted to UploadByUploadIdForm.")]
        ) from None


def _int_param(request: web.BaseRequest, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise E.validation_failed([(name, f"The value '{raw}' is not valid for {name}.")]) from None
    if not lo <= value <= hi:
        raise E.validation_failed([(name, f"{name} must be between {lo} and {hi}.")])
    return value


def page_params(request: web.BaseRequest) -> tuple[int, int]:
    """(page, pageSize) of a list route, checked before the entity is looked up (as awork)."""
    return _int_param(request, "page", 1, 1, 1_000_000), _int_param(request, "pageSize", 10, 1, 1000)


def paged_response(
    items: Sequence[_T], page: tuple[int, int], render: Callable[[_T], Any]
) -> web.Response:
    """One page of `items`, rendered, with awork's aw-page/aw-pagesize/aw-items/aw-totalitems."""
    number, size = page
    chosen = [render(item) for item in items[(number - 1) * size : number * size]]
    return json_response(
        chosen,
        headers={
            "aw-page": str(number),
            "aw-pagesize": str(size),
            "aw-items": str(len(chosen)),
            "aw-totalitems": str(len(items)),
        },
    )


def file_of(ctx: Ctx, file_id: str, entity: str | None, entity_id: str | None) -> StoredFile:
    f = ctx.sandbox.state.files.get(file_id.lower()) if _UUID.match(file_id) else None
    if (
        f is None
        or f.workspace != ctx.workspace
        or (entity is not None and (f.image or f.entity != entity or f.entity_id != entity_id))
    ):
        raise E.not_found(f"No file with the id '{file_id}' exists.")
    return f


def abort_connection(request: web.BaseRequest) -> None:
    """Cut the TCP connection without an answer (an injected drop)."""
    transport = request.transport
    if transport is not None:
        transport.abort()

