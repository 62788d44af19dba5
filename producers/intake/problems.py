"""Errors as RFC 9457 problem details (`application/problem+json`), naming the field at fault."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from producers.contract import SpecError

MEDIA_TYPE = "application/problem+json"
TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Content",
    429: "Too Many Requests",
    503: "Service Unavailable",
}


class Problem(Exception):
    """An error answer. `code` becomes the type URI `urn:awork-uploads:problem:<code>`."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail, self.field = status, code, detail, field
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "type": f"urn:awork-uploads:problem:{self.code}",
            "title": TITLES.get(self.status, "Error"),
            "status": self.status,
            "detail": self.detail,
        }
        if self.field:
            out["field"] = self.field
        return out

    @classmethod
    def from_spec(cls, exc: SpecError) -> Problem:
        return cls(422, "invalid-field", str(exc), exc.field)


def response(problem: Problem) -> JSONResponse:
    return JSONResponse(problem.body(), problem.status, headers=problem.headers, media_type=MEDIA_TYPE)


async def on_problem(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Problem)
    return response(exc)


def invalid_request(errors: Sequence[Any], parts: tuple[str, ...] = ()) -> Problem:
    """Pydantic's errors (a model read from the body, or FastAPI's request checks, whose
    locations also name the request `parts`, left out of the field) as a 400 naming the first
    field at fault: bad JSON, wrong types, missing fields."""
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p not in parts]
    field = ".".join(loc) or "body"
    if first.get("type") == "json_invalid":
        return Problem(400, "malformed-json", "body: malformed JSON", "body")
    return Problem(400, "malformed-request", f"{field}: {first.get('msg', 'invalid')}", field)


async def on_validation(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return response(invalid_request(exc.errors(), ("body", "query", "path", "header")))


async def on_http(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    code = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "http-error")
    headers = dict(exc.headers or {})
    return response(Problem(exc.status_code, code, str(exc.detail), headers=headers))
