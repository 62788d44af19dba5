"""Bearer tokens (producers.api_tokens): 401 without a valid one, 403 outside its workspaces,
429 with Retry-After over its rate."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool

from producers.api_tokens import ApiTokens, Authenticated, TokenInfo
from producers.intake.problems import Problem

CHALLENGE = {"WWW-Authenticate": 'Bearer realm="awork-uploads"'}


async def authenticate(request: Request) -> TokenInfo:
    """The request's token, counted against its rate (one Redis round trip)."""
    return await run_in_threadpool(authenticate_sync, request)


# A route's parameter: the authenticated token.
Auth = Annotated[TokenInfo, Depends(authenticate)]


def presented_token(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        raise Problem(
            401, "unauthenticated", "authorization: a bearer token is required", "authorization", CHALLENGE
        )
    return presented.strip()


def authenticate_sync(request: Request) -> TokenInfo:
    """`authenticate` for code already in a worker thread."""
    tokens: ApiTokens = request.app.state.tokens
    return checked(tokens.authenticate(presented_token(request)))


def checked(found: Authenticated | None) -> TokenInfo:
    """401 for an unknown token, 429 over its rate, else the token."""
    if found is None:
        raise Problem(
            401, "unauthenticated", "authorization: unknown or revoked token", "authorization", CHALLENGE
        )
    if found.over_rate:
        raise Problem(
            429,
            "rate-limited",
            f"more than {found.token.rate} requests per second for this token",
            headers={"Retry-After": str(found.retry_after)},
        )
    return found.token


def require_workspace(token: TokenInfo, workspace: str, field: str = "workspace") -> None:
    if workspace not in token.workspaces:
        raise Problem(
            403, "workspace-forbidden", f"{field}: this token may not enqueue into {workspace!r}", field
        )
