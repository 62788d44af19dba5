"""awork's OAuth 2.0 endpoints, as the sandbox plays them.

awork's developer docs (https://developers.awork.com/authentication, "OAuth 2 Flow"):
`GET /api/v1/accounts/authorize` (client_id, redirect_uri, response_type=code, scope, state,
PKCE code_challenge + code_challenge_method=S256) sends the browser back to redirect_uri with
`code` and `state`; `POST /api/v1/accounts/token` (form-encoded, client authenticated with HTTP
Basic) takes `grant_type=authorization_code` (code, redirect_uri, code_verifier) or
`grant_type=refresh_token` and answers access_token, token_type Bearer, expires_in,
refresh_token. Refresh tokens are single-use: each refresh returns a new one and the old one
answers `invalid_grant` from then on. An access token is valid for one workspace.

The sandbox's authorize page approves at once (tests have no browser); `workspace=NAME` in its
query picks the workspace the user would pick in awork (default: a new one per grant), so each
grant has its own rate windows and sees its own entities. Revocation (awork: a user removes the
client under their account) is the admin API's `POST /_sandbox/oauth/revoke`: the grant's
refresh token then answers `invalid_grant` and its access tokens 401.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from .auth import same_secret

AUTHORIZE_PATH = "/accounts/authorize"
TOKEN_PATH = "/accounts/token"
CODE_LIFETIME_S = 60.0
_NS = uuid.UUID("0b7f4f7e-5b7c-4a44-9a2f-3e1f4c9d8a11")


@dataclass
class Grant:
    id: str
    client_id: str
    workspace: str
    user_id: str
    refresh_token: str
    revoked: bool = False
    refreshes: int = 0


@dataclass
class _Code:
    client_id: str
    redirect_uri: str
    challenge: str
    workspace: str
    expires: float


@dataclass
class OAuthStats:
    token_requests: Counter[str] = field(default_factory=Counter)  # grant_type -> count
    errors: Counter[str] = field(default_factory=Counter)  # error code -> count
    refreshes_by_workspace: Counter[str] = field(default_factory=Counter)
    authorizations: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "token_requests": dict(self.token_requests),
            "errors": dict(self.errors),
            "invalid_grant": self.errors.get("invalid_grant", 0),
            "refreshes_by_workspace": dict(self.refreshes_by_workspace),
            "authorizations": self.authorizations,
        }


class OAuthError(Exception):
    def __init__(self, status: int, error: str, description: str) -> None:
        super().__init__(description)
        self.status = status
        self.error = error
        self.description = description

    def body(self) -> dict[str, str]:
        return {"error": self.error, "error_description": self.description}


class OAuthServer:
    def __init__(self, clients: dict[str, str]) -> None:
        self.clients = dict(clients)  # client_id -> client_secret
        self.access_lifetime_s = 86400.0  # awork's examples; the admin API changes it
        self.grants: dict[str, Grant] = {}
        self._codes: dict[str, _Code] = {}
        self._refresh: dict[str, str] = {}  # current refresh token -> grant id
        self._spent: set[str] = set()  # refresh tokens already used once
        self._access: dict[str, tuple[str, float]] = {}  # access token -> (grant id, expires)
        # Every token issued (bounded): the admin API hands them to leak scans in tests.
        self.issued: list[str] = []
        self.stats = OAuthStats()

    def reset(self) -> None:
        self.__init__(self.clients)  # type: ignore[misc]

    # -- the authorize page ------------------------------------------------------------------
    def authorize(self, query: dict[str, str]) -> str:
        """The Location the browser is sent to (the page approves at once)."""
        client_id = query.get("client_id", "")
        if client_id not in self.clients:
            raise OAuthError(400, "invalid_client", "unknown client_id")
        redirect_uri = query.get("redirect_uri", "")
        if urlsplit(redirect_uri).scheme not in ("http", "https"):
            raise OAuthError(400, "invalid_request", "redirect_uri must be an http(s) URL")
        if query.get("response_type") != "code":
            raise OAuthError(400, "unsupported_response_type", "response_type must be code")
        scopes = set(query.get("scope", "").split())
        if "offline_access" not in scopes:
            raise OAuthError(400, "invalid_scope", "scope must include offline_access")
        challenge = query.get("code_challenge", "")
        if not challenge or query.get("code_challenge_method") != "S256":
            raise OAuthError(400, "invalid_request", "PKCE code_challenge with method S256 is required")
        workspace = query.get("workspace") or f"oauth-{len(self.grants) + len(self._codes) + 1}"
        code = secrets.token_urlsafe(24)
        expires = time.time() + CODE_LIFETIME_S
        self._codes[code] = _Code(client_id, redirect_uri, challenge, workspace, expires)
        self.stats.authorizations += 1
        params = {"code": code}
        if "state" in query:
            params["state"] = query["state"]
        sep = "&" if urlsplit(redirect_uri).query else "?"
        return f"{redirect_uri}{sep}{urlencode(params)}"

    # -- the token endpoint ------------------------------------------------------------------
    def token(self, authorization: str, body: bytes) -> dict[str, Any]:
        form = dict(parse_qsl(body.decode(errors="replace")))
        grant_type = form.get("grant_type", "")
        self.stats.token_requests[grant_type or "<none>"] += 1
        try:
            client_id = self._client(authorization)
            if grant_type == "authorization_code":
                return self._from_code(client_id, form)
            if grant_type == "refresh_token":
                return self._from_refresh(client_id, form)
            raise OAuthError(400, "unsupported_grant_type", f"grant_type {grant_type!r}")
        except OAuthError as exc:
            self.stats.errors[exc.error] += 1
            raise

    def _client(self, authorization: str) -> str:
        scheme, _, raw = authorization.partition(" ")
        if scheme.lower() != "basic":
            raise OAuthError(401, "invalid_client", "client authentication (HTTP Basic) required")
        try:
            cid, _, secret = base64.b64decode(raw.strip()).decode().partition(":")
        except ValueError:
            raise OAuthError(401, "invalid_client", "malformed Basic credentials") from None
        expected = self.clients.get(cid)  # the id is not a secret; the secret is compared below
        if expected is None or not same_secret(secret, expected):
            raise OAuthError(401, "invalid_client", "unknown client or wrong secret")
        return cid

    def _from_code(self, client_id: str, form: dict[str, str]) -> dict[str, Any]:
        code = self._codes.pop(form.get("code", ""), None)
        if code is None or code.expires < time.time() or code.client_id != client_id:
            raise OAuthError(400, "invalid_grant", "unknown, used or expired authorization code")
        if form.get("redirect_uri") != code.redirect_uri:
            raise OAuthError(400, "invalid_grant", "redirect_uri does not match the authorization")
        verifier = form.get("code_verifier", "")
        digest = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        if not verifier or digest != code.challenge:
            raise OAuthError(400, "invalid_grant", "code_verifier does not match the code_challenge")
        grant_id = uuid.uuid4().hex
        grant = Grant(grant_id, client_id, code.workspace, str(uuid.uuid5(_NS, grant_id)), "")
        self.grants[grant_id] = grant
        return self._issue(grant)

    def _from_refresh(self, client_id: str, form: dict[str, str]) -> dict[str, Any]:
        token = form.get("refresh_token", "")
        grant_id = self._refresh.get(token)
        grant = self.grants.get(grant_id) if grant_id else None
        if grant is None or grant.revoked or grant.client_id != client_id:
            why = "refresh token already used" if token in self._spent else "unknown or revoked refresh token"
            raise OAuthError(400, "invalid_grant", why)
        del self._refresh[token]
        self._spent.add(token)
        grant.refreshes += 1
        self.stats.refreshes_by_workspace[grant.workspace] += 1
        return self._issue(grant)

    def _issue(self, grant: Grant) -> dict[str, Any]:
        access = secrets.token_urlsafe(32)
        refresh = secrets.token_urlsafe(32)
        now = time.time()
        self._access[access] = (grant.id, now + self.access_lifetime_s)
        grant.refresh_token = refresh
        self._refresh[refresh] = grant.id
        self.issued += [access, refresh]
        del self.issued[:-20_000]
        if len(self._access) > 10_000:  # forget lapsed tokens
            self._access = {k: v for k, v in self._access.items() if v[1] > now}
        return {
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": self.access_lifetime_s,
            "refresh_token": refresh,
            "scope": "full_access offline_access",
        }

    # -- the API's view ----------------------------------------------------------------------
    def access(self, token: str) -> tuple[str, str] | None:
        """(workspace, user id) of a live access token."""
        found = self._access.get(token)
        if found is None:
            return None
        grant = self.grants.get(found[0])
        if grant is None or grant.revoked or found[1] <= time.time():
            return None
        return grant.workspace, grant.user_id

    def revoke(self, workspace: str | None = None, grant_id: str | None = None) -> int:
        n = 0
        for grant in self.grants.values():
            if grant.revoked:
                continue
            if (workspace is not None and grant.workspace == workspace) or grant.id == grant_id:
                grant.revoked = True
                self._refresh.pop(grant.refresh_token, None)
                n += 1
        return n

    def to_json(self) -> dict[str, Any]:
        return {
            **self.stats.to_json(),
            "access_lifetime_s": self.access_lifetime_s,
            "grants": [
                {"id": g.id, "workspace": g.workspace, "revoked": g.revoked, "refreshes": g.refreshes}
                for g in self.grants.values()
            ],
        }
