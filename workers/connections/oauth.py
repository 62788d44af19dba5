"""awork's OAuth 2.0 authorization-code flow (with PKCE) and its token endpoint.

From awork's developer docs (https://developers.awork.com/authentication, "OAuth 2 Flow"):
authorize at `{AWORK_API_URL}/accounts/authorize`, tokens at `{AWORK_API_URL}/accounts/token`
(form-encoded; the client authenticates with HTTP Basic client_id:client_secret); scopes
`full_access offline_access` (offline_access issues a refresh token); an access token is valid
for one workspace and "usually a few days" (`expires_in`); a refresh token is single-use (each
refresh returns a new one and invalidates the old) and expires after 30 days unused.

`begin_authorization` / `complete_authorization` are the Python calls for an application's own
OAuth callback page; `awork-uploads connections oauth-url|oauth-complete` wrap them.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import redis
import requests

from producers.config import ConfigError
from producers.connections import OAUTH_PENDING_TTL_SECONDS, ConnectionInfo, check_name
from producers.keys import oauth_pending_key
from workers.connections.store import ConnectionStore, TokenSet
from workers.errors import PermanentError, TransientError
from workers.secret_files import secret_from_env
from workers.settings import Secret

SCOPES = "full_access offline_access"
AUTHORIZE_PATH = "/accounts/authorize"
TOKEN_PATH = "/accounts/token"
USER_AGENT = "awork-uploads/0.1"


class InvalidGrant(PermanentError):
    """The token endpoint refused the grant (revoked, expired, or a refresh token used twice)."""


@dataclass(frozen=True)
class OAuthClient:
    """The integration's client credentials: AWORK_OAUTH_CLIENT_ID / _SECRET (or _FILE)."""

    client_id: str
    client_secret: Secret = field(repr=False)
    api_url: str
    timeout: tuple[float, float] = (10.0, 30.0)

    @classmethod
    def from_env(cls, api_url: str, environ: Mapping[str, str] | None = None) -> OAuthClient:
        env = os.environ if environ is None else environ
        cid = secret_from_env(env, "AWORK_OAUTH_CLIENT_ID", private=False)
        secret = secret_from_env(env, "AWORK_OAUTH_CLIENT_SECRET")
        if not cid or not secret:
            raise ConfigError(
                "AWORK_OAUTH_CLIENT_ID / AWORK_OAUTH_CLIENT_SECRET: not set (OAuth connections need "
                "the integration's client credentials; _FILE variants work too)"
            )
        return cls(cid, Secret(secret), api_url.rstrip("/"))

    def authorize_url(self, redirect_uri: str, state: str, challenge: str) -> str:
        query = urlencode(
            {
                "client_id": self.client_id,
                "redirect_uri": redirect_uri,
                "response_type": "code",
                "scope": SCOPES,
                "state": state,
                "code_challenge": challenge,
                "code_challenge_method": "S256",
            }
        )
        return f"{self.api_url}{AUTHORIZE_PATH}?{query}"

    def exchange_code(self, code: str, redirect_uri: str, verifier: str) -> TokenSet:
        return self._token(
            {
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": redirect_uri,
                "code_verifier": verifier,
            }
        )

    def refresh(self, refresh_token: Secret) -> TokenSet:
        return self._token({"grant_type": "refresh_token", "refresh_token": refresh_token.reveal()})

    def _token(self, form: dict[str, str]) -> TokenSet:
        try:
            resp = requests.post(
                f"{self.api_url}{TOKEN_PATH}",
                data=form,
                auth=(self.client_id, self.client_secret.reveal()),
                headers={"User-Agent": USER_AGENT, "Accept": "application/json"},
                timeout=self.timeout,
            )
        except requests.exceptions.RequestException as exc:
            raise TransientError(f"token endpoint: {type(exc).__name__}") from None
        body: Any
        try:
            body = resp.json()
        except ValueError:
            body = {}
        if not isinstance(body, dict):
            body = {}
        if resp.status_code == 400 and body.get("error") == "invalid_grant":
            raise InvalidGrant("token endpoint: invalid_grant", status=400, code="invalid_grant")
        if resp.status_code >= 500 or resp.status_code == 429:
            raise TransientError(f"token endpoint: HTTP {resp.status_code}", status=resp.status_code)
        if resp.status_code != 200:
            # invalid_client, unauthorized_client, ...: the integration's setup, not the grant
            code = str(body.get("error") or f"http-{resp.status_code}")
            raise PermanentError(f"token endpoint: {code}", status=resp.status_code, code=code)
        access, refresh = body.get("access_token"), body.get("refresh_token")
        if not access or not refresh:
            raise TransientError("token endpoint: answer without access_token/refresh_token")
        return TokenSet(Secret(str(access)), Secret(str(refresh)), float(body.get("expires_in") or 0))


def oauth_client_from_env(api_url: str, environ: Mapping[str, str] | None = None) -> OAuthClient | None:
    """The client credentials, or None when AWORK_OAUTH_CLIENT_ID (or _FILE) is not set."""
    env = os.environ if environ is None else environ
    if not any(env.get(n, "").strip() for n in ("AWORK_OAUTH_CLIENT_ID", "AWORK_OAUTH_CLIENT_ID_FILE")):
        return None
    return OAuthClient.from_env(api_url, env)


def pkce_pair() -> tuple[str, str]:
    """(code_verifier, S256 code_challenge) as RFC 7636 describes."""
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode()).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def begin_authorization(
    store: ConnectionStore,
    client: OAuthClient,
    name: str,
    redirect_uri: str,
    limits: Mapping[str, object] | None = None,
) -> str:
    """The URL to send the customer to; state and PKCE verifier wait in Redis for 10 minutes."""
    check_name(name)
    if not redirect_uri.startswith(("https://", "http://")):
        raise ConfigError(f"redirect_uri: expected an http(s) URL, got {redirect_uri!r}")
    verifier, challenge = pkce_pair()
    state = secrets.token_urlsafe(24)
    pending = store.box.seal(
        {"name": name, "verifier": verifier, "redirect_uri": redirect_uri, "limits": dict(limits or {})}
    )
    store.redis.set(oauth_pending_key(state), pending, ex=OAUTH_PENDING_TTL_SECONDS)
    return client.authorize_url(redirect_uri, state, challenge)


def complete_authorization(
    store: ConnectionStore, client: OAuthClient, name: str, code: str, state: str
) -> ConnectionInfo:
    """Exchange the code the customer came back with; the connection is (again) active."""
    raw = _take(store.redis, oauth_pending_key(state))
    if raw is None:
        raise ConfigError("state: unknown or expired (an authorization waits 10 minutes; start again)")
    pending = store.box.open(raw)
    if pending.get("name") != name:
        raise ConfigError(f"state: it belongs to connection {pending.get('name')!r}, not {name!r}")
    tokens = client.exchange_code(code, str(pending["redirect_uri"]), str(pending["verifier"]))
    return store.add_oauth(
        name,
        tokens.refresh_token.reveal(),
        tokens.access_token.reveal(),
        tokens.expires_in,
        limits=pending.get("limits") or None,
    )


def _take(client: redis.Redis, key: str) -> bytes | None:
    """GET and DELETE in one step: a state is good for one completion."""
    pipe = client.pipeline()
    pipe.get(key)
    pipe.delete(key)
    value = pipe.execute()[0]
    return value if isinstance(value, bytes) else (value.encode() if isinstance(value, str) else None)
