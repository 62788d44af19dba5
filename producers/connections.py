"""The connection registry as producers see it: names, kinds and states, never secrets.

A connection is one customer workspace the fleet may upload into: an API key or an OAuth grant,
plus the workspace's plan limits. The registry in Redis is the source of truth; the workers'
AWORK_WORKSPACES_FILE (and AWORK_API_KEY for `default`) still work and act as connections that
are not in Redis. Every Redis key of the registry is named here, so that producers, workers and
operators agree on them. The `secret` field of a connection's hash is Fernet ciphertext that
only workers (holding AWORK_SECRETS_KEY) can read; this module never returns it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

import redis

from producers import keys
from producers.contract import SpecError
from producers.keys import CONNECTIONS_KEY, connection_key
from producers.redis_text import as_str

# Key names (producers.keys) under the names the connection modules import them by.
REFRESHED_KEY = keys.CONNECTIONS_REFRESHED_KEY
refresh_lock_key = keys.connection_refresh_lock_key
OAUTH_PENDING_TTL_SECONDS = 600  # an authorization in progress (keys.oauth_pending_key)

SECRET_FIELD = "secret"  # ciphertext; never leaves the workers
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class Kind(StrEnum):
    API_KEY = "api_key"
    OAUTH = "oauth"


class ConnState(StrEnum):
    ACTIVE = "active"
    # The grant was revoked or broke: jobs park until the customer connects again.
    NEEDS_RECONNECT = "needs_reconnect"


@dataclass(frozen=True)
class ConnectionInfo:
    """What anyone may see about a connection."""

    name: str
    kind: str
    state: str
    plan: str
    per_minute: int | None
    per_second: int | None
    version: int
    created_at: float
    updated_at: float
    access_expires_at: float | None
    refreshed_at: float | None
    refreshes: int
    reason: str | None

    def to_json(self) -> dict[str, object]:
        return dict(self.__dict__)

    @classmethod
    def from_hash(cls, name: str, raw: dict[str, str]) -> ConnectionInfo:
        def opt_float(k: str) -> float | None:
            v = raw.get(k)
            return float(v) if v else None

        def opt_int(k: str) -> int | None:
            v = raw.get(k)
            return int(v) if v else None

        return cls(
            name=name,
            kind=raw.get("kind", ""),
            state=raw.get("state", ConnState.ACTIVE.value),
            plan=raw.get("plan", "standard"),
            per_minute=opt_int("per_minute"),
            per_second=opt_int("per_second"),
            version=int(raw.get("version") or 0),
            created_at=float(raw.get("created_at") or 0),
            updated_at=float(raw.get("updated_at") or 0),
            access_expires_at=opt_float("access_expires_at"),
            refreshed_at=opt_float("refreshed_at"),
            refreshes=int(raw.get("refreshes") or 0),
            reason=raw.get("reason") or None,
        )


def check_name(name: str) -> str:
    """A connection name: letters, digits, `_.-`, at most 64 characters."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise SpecError("workspace", f"{name!r} is not a valid connection name (letters, digits, _ . -)")
    return name


class ConnectionRegistry:
    """Read-only view of the registry, for producers and the CLI's list/show."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def names(self) -> set[str]:
        return {as_str(m) for m in self.redis.smembers(CONNECTIONS_KEY)}

    def get(self, name: str) -> ConnectionInfo | None:
        raw = self.redis.hgetall(connection_key(name))
        if not raw:
            return None
        fields = {as_str(k): as_str(v) for k, v in raw.items()}
        fields.pop(SECRET_FIELD, None)
        return ConnectionInfo.from_hash(name, fields)

    def list(self) -> list[ConnectionInfo]:
        names = sorted(self.names())
        pipe = self.redis.pipeline(transaction=False)
        for n in names:
            pipe.hgetall(connection_key(n))
        out = []
        for n, raw in zip(names, pipe.execute(), strict=True):
            if raw:
                fields = {as_str(k): as_str(v) for k, v in raw.items()}
                fields.pop(SECRET_FIELD, None)
                out.append(ConnectionInfo.from_hash(n, fields))
        return out
