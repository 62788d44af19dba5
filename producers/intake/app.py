"""The ASGI application: routes, problem handlers, health, and the OpenAPI document."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from producers.api_tokens import ApiTokens
from producers.client import RedisUnavailable, Uploads
from producers.intake import problems, routes_batches, routes_jobs
from producers.intake.problems import Problem
from producers.intake.schemas import PROBLEM, Health, Ready, problem_responses
from producers.intake.settings import IntakeSettings
from producers.redis_conn import async_redis_client

log = logging.getLogger("awork.intake")
VERSION = "1.0.0"


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    await app.state.aredis.aclose()


def create_app(settings: IntakeSettings, uploads: Uploads | None = None) -> FastAPI:
    app = FastAPI(
        lifespan=_lifespan,
        title="awork-uploads intake",
        version=VERSION,
        description="Enqueue files for upload into awork from any language; see README, HTTP API.",
        docs_url=None,
        redoc_url=None,
    )
    up = uploads or Uploads(settings.shared, redis_retry_seconds=3.0)
    app.state.settings = settings
    app.state.uploads = up
    app.state.tokens = ApiTokens(up.redis)
    # the polling path (GET /v1/jobs/{id}) reads without the thread pool, as str
    app.state.aredis = async_redis_client(
        settings.shared.redis_url, socket_connect_timeout=3, socket_timeout=10, decode_responses=True
    )
    app.add_exception_handler(Problem, problems.on_problem)
    app.add_exception_handler(RequestValidationError, problems.on_validation)
    app.add_exception_handler(HTTPException, problems.on_http)
    app.add_exception_handler(RedisUnavailable, _unavailable)
    app.add_exception_handler(redis.exceptions.ConnectionError, _unavailable)
    app.add_exception_handler(redis.exceptions.TimeoutError, _unavailable)
    app.include_router(routes_jobs.router)
    app.include_router(routes_batches.router)

    @app.get("/healthz", response_model=Health, summary="The process is up")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", response_model=Ready, responses=problem_responses(503), summary="Redis answers")
    async def readyz(request: Request) -> dict[str, str]:
        try:
            await run_in_threadpool(request.app.state.uploads.redis.ping)
        except redis.exceptions.RedisError:
            raise Problem(503, "redis-unavailable", "redis: not reachable") from None
        return {"status": "ready"}

    base_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = problem_media(base_openapi())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def problem_media(doc: dict[str, Any]) -> dict[str, Any]:
    """Error answers are application/problem+json; FastAPI writes them as application/json.
    Also: the bearer scheme, required by every /v1 operation."""
    doc.setdefault("components", {}).setdefault("securitySchemes", {})["bearer"] = {
        "type": "http",
        "scheme": "bearer",
    }
    for path, ops in doc.get("paths", {}).items():
        for op in ops.values():
            if path.startswith("/v1/"):
                op["security"] = [{"bearer": []}]
            responses = op.get("responses", {})
            for status, answer in responses.items():
                content = answer.get("content", {})
                if status.startswith(("4", "5")) and "application/json" in content:
                    content[PROBLEM] = content.pop("application/json")
            # FastAPI adds a 422 HTTPValidationError to every operation with parameters; ours
            # answer 400 for those, and 422 only where the route documents it (a spec field)
            if "422" in responses and "ProblemOut" not in str(responses["422"]):
                del responses["422"]
    return doc


async def _unavailable(_: Request, exc: Exception) -> Any:
    log.warning("redis unavailable: %s", type(exc).__name__)
    return problems.response(Problem(503, "redis-unavailable", "redis: not reachable, try again"))
