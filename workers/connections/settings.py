"""Connection settings of a worker, read once at start and passed down.

AWORK_SECRETS_KEY / AWORK_SECRETS_KEY_FILE: without them the worker serves only the workspaces of
AWORK_WORKSPACES_FILE / AWORK_API_KEY. AWORK_OAUTH_CLIENT_ID / _SECRET (or _FILE): needed for
OAuth connections. AWORK_CONNECTION_CACHE_SECONDS (5): how long a loaded connection is used
before its version is checked again. AWORK_CONNECTION_RECHECK_SECONDS (60): how often a job
waiting for its connection looks again. AWORK_OAUTH_KEEPALIVE_SECONDS (7 days): an OAuth grant
not refreshed for this long is refreshed (awork's refresh tokens expire after 30 days unused).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from producers.config import ConfigError, env_float
from workers.connections.crypto import ENV_KEY, ENV_KEY_FILE, SecretBox
from workers.connections.oauth import OAuthClient, oauth_client_from_env

DEFAULT_KEEPALIVE_SECONDS = 7 * 24 * 3600.0


@dataclass(frozen=True)
class ConnectionSettings:
    box: SecretBox | None = field(repr=False)
    oauth: OAuthClient | None = field(repr=False)
    cache_seconds: float = 5.0
    recheck_seconds: float = 60.0
    keepalive_seconds: float = DEFAULT_KEEPALIVE_SECONDS

    @classmethod
    def from_env(cls, api_url: str, environ: Mapping[str, str] | None = None) -> ConnectionSettings:
        env = os.environ if environ is None else environ
        box = None
        if env.get(ENV_KEY, "").strip() or env.get(ENV_KEY_FILE, "").strip():
            box = SecretBox.from_env(env)
        return cls(
            box=box,
            oauth=oauth_client_from_env(api_url, env),
            cache_seconds=_seconds("AWORK_CONNECTION_CACHE_SECONDS", 5.0),
            recheck_seconds=_seconds("AWORK_CONNECTION_RECHECK_SECONDS", 60.0),
            keepalive_seconds=_seconds("AWORK_OAUTH_KEEPALIVE_SECONDS", DEFAULT_KEEPALIVE_SECONDS),
        )


def _seconds(name: str, default: float) -> float:
    value = env_float(name, default)
    if value < 0:
        raise ConfigError(f"{name}: must not be negative, got {value:g}")
    return value
