"""The admin API under /_sandbox: seed entities, set faults, reset, read the counters.

Guarded by its own bearer token so that a worker holding an awork API key cannot reach it.
Plain JSON errors ({"error": ...}): this is the sandbox's API, not awork's.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from aiohttp import web

from .auth import same_secret
from .core import Sandbox
from .state import ENTITY_TYPES


class AdminError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        status=status, body=json.dumps(data, indent=1).encode(), content_type="application/json"
    )


def seed_entities(sandbox: Sandbox, body: Any) -> list[dict[str, str | None]]:
    """Add {"type", "id"?, "workspace"?} or a list of them; a missing id is generated."""
    items = body if isinstance(body, list) else [body]
    parsed: list[tuple[str, str, str | None]] = []
    for item in items:
        if not isinstance(item, dict):
            raise AdminError(400, "each entity is an object {type, id, workspace?}")
        etype = str(item.get("type", "")).lower()
        if etype not in ENTITY_TYPES:
            raise AdminError(
                400, f"unknown type {item.get('type')!r}; one of {', '.join(ENTITY_TYPES)}"
            )
        raw_id = item.get("id")
        try:
            eid = str(uuid.UUID(str(raw_id))) if raw_id is not None else str(uuid.uuid4())
        except ValueError:
            raise AdminError(400, f"id {raw_id!r} is not a UUID (awork ids are)") from None
        ws = item.get("workspace")
        if ws is not None and not isinstance(ws, str):
            raise AdminError(400, "workspace must be a string")
        parsed.append((etype, eid, ws))
    for etype, eid, ws in parsed:
        sandbox.state.entities[etype][eid] = ws
    return [{"type": t, "id": i, "workspace": w} for t, i, w in parsed]


def stats(sandbox: Sandbox) -> dict[str, Any]:
    state = sandbox.state
    out = state.counters.to_json()
    out["files"] = [f.to_stats() for f in state.files.values()]
    out["uploads"] = {uid: up.to_json() for uid, up in state.uploads.items()}
    out["entities"] = {t: len(ids) for t, ids in state.entities.items()}
    out["settings"] = sandbox.settings.to_json()
    out["oauth"] = sandbox.oauth.to_json()
    return out


class AdminApi:
    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        self._auth = f"Bearer {sandbox.config.admin_token}"

    async def handle(self, request: web.BaseRequest, sub_path: str) -> web.StreamResponse:
        path = sub_path.rstrip("/").lower()
        method = request.method
        try:
            if path == "/health" and method == "GET":
                return _json({"ok": True})
            if not same_secret(request.headers.get("Authorization", ""), self._auth):
                raise AdminError(401, "missing or wrong admin token (Authorization: Bearer ...)")
            if path == "/stats" and method == "GET":
                return _json(stats(self.sandbox))
            if path == "/entities" and method == "GET":
                return _json(self.sandbox.state.entities_json())
            if path == "/entities" and method == "POST":
                return _json({"created": seed_entities(self.sandbox, await _body(request))})
            if path == "/faults" and method == "GET":
                return _json(self.sandbox.settings.to_json())
            if path == "/faults" and method == "POST":
                body = await _body(request)
                try:
                    new = self.sandbox.settings.patched(body)
                except ValueError as exc:
                    raise AdminError(400, str(exc)) from None
                self.sandbox.apply_settings(new, reseed="seed" in body)
                return _json(new.to_json())
            if path == "/oauth" and method == "GET":
                return _json(self.sandbox.oauth.to_json())
            if path == "/oauth" and method == "POST":
                body = await _body(request)
                lifetime = body.get("access_lifetime_s") if isinstance(body, dict) else None
                if isinstance(lifetime, bool) or not isinstance(lifetime, int | float) or lifetime <= 0:
                    raise AdminError(400, "access_lifetime_s: expected a number of seconds > 0")
                self.sandbox.oauth.access_lifetime_s = float(lifetime)
                return _json(self.sandbox.oauth.to_json())
            if path == "/oauth/issued" and method == "GET":
                # for leak scans in tests: which tokens must never show up in plain text
                return _json({"tokens": self.sandbox.oauth.issued})
            if path == "/oauth/revoke" and method == "POST":
                body = await _body(request)
                if not isinstance(body, dict) or not (body.get("workspace") or body.get("grant")):
                    raise AdminError(400, "expected {\"workspace\": NAME} or {\"grant\": ID}")
                n = self.sandbox.oauth.revoke(body.get("workspace"), body.get("grant"))
                return _json({"revoked": n})
            if path == "/reset" and method == "POST":
                body = await _body(request, default={})
                if not isinstance(body, dict):
                    raise AdminError(400, "expected {} or {\"entities\": true, \"faults\": true}")
                self.sandbox.reset(
                    entities=bool(body.get("entities")), faults=bool(body.get("faults"))
                )
                return _json({"reset": True})
            raise AdminError(404, f"no admin route {method} /_sandbox{sub_path}")
        except AdminError as exc:
            return _json({"error": exc.message}, status=exc.status)


async def _body(request: web.BaseRequest, default: Any = None) -> Any:
    raw = await request.read()
    if not raw.strip():
        if default is not None:
            return default
        raise AdminError(400, "expected a JSON body")
    try:
        return json.loads(raw)
    except ValueError:
        raise AdminError(400, "the body is not valid JSON") from None
