"""The registry with its secrets: add, load, store refreshed tokens, park, remove, rekey.

One Redis hash per connection (producers.connections.connection_key). The `secret` field holds
every credential of the connection in one Fernet token, so that a new refresh token and its
access token are always written together (one HSET). `version` grows with every change; workers
compare it to drop what they cached.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import redis

from producers.config import ConfigError
from producers.connections import (
    SECRET_FIELD,
    ConnectionInfo,
    ConnectionRegistry,
    ConnState,
    Kind,
    check_name,
)
from producers.keys import (
    CONNECTION_CHANGES_CHANNEL,
    CONNECTIONS_KEY,
    CONNECTIONS_REFRESHED_KEY,
    OAUTH_PENDING_PREFIX,
    connection_key,
)
from producers.redis_text import as_str
from workers.connections.crypto import SecretBox
from workers.fair_share import check_share
from workers.limits_config import WorkspaceLimits, limits_from_table
from workers.settings import Secret

PLAN_FIELDS = ("plan", "per_minute", "per_second", "margin", "share")


@dataclass(frozen=True)
class Connection:
    """A connection with its credentials decrypted (workers only)."""

    name: str
    kind: Kind
    state: ConnState
    limits: WorkspaceLimits
    version: int
    api_key: Secret | None = field(default=None, repr=False)
    access_token: Secret | None = field(default=None, repr=False)
    refresh_token: Secret | None = field(default=None, repr=False)
    access_expires_at: float = 0.0
    access_lifetime: float = 0.0
    share: float = 1.0  # its weight in the fleet's transfer slots (workers/fair_share.py)

    def bearer(self) -> Secret | None:
        return self.api_key if self.kind is Kind.API_KEY else self.access_token


@dataclass(frozen=True)
class TokenSet:
    """What awork's token endpoint answers."""

    access_token: Secret = field(repr=False)
    refresh_token: Secret = field(repr=False)
    expires_in: float = 0.0


def plan_fields(limits: Mapping[str, object]) -> dict[str, str]:
    """Plan settings for the hash, checked the same way as the TOML file's."""
    table = {k: v for k, v in limits.items() if v is not None and k in PLAN_FIELDS}
    limits_from_table(table, "connection")  # raises ConfigError naming the field
    if "share" in table:
        check_share(table["share"], "connection.share")
    return {k: str(v) for k, v in table.items()}


class ConnectionStore:
    def __init__(self, client: redis.Redis, box: SecretBox) -> None:
        self.redis = client
        self.box = box
        self.registry = ConnectionRegistry(client)

    # -- writes ------------------------------------------------------------------------------
    def _write(self, name: str, fields: dict[str, str], clear: tuple[str, ...] = ()) -> None:
        key = connection_key(name)
        now = repr(time.time())
        pipe = self.redis.pipeline()
        pipe.hsetnx(key, "created_at", now)
        if clear:
            pipe.hdel(key, *clear)
        mapping: dict[Any, Any] = {**fields, "updated_at": now}
        pipe.hset(key, mapping=mapping)
        pipe.hincrby(key, "version", 1)
        pipe.sadd(CONNECTIONS_KEY, name)
        pipe.publish(CONNECTION_CHANGES_CHANNEL, name)
        pipe.execute()

    def add_api_key(
        self, name: str, api_key: str, limits: Mapping[str, object] | None = None
    ) -> ConnectionInfo:
        check_name(name)
        if not api_key.strip():
            raise ConfigError("api_key: empty")
        fields = {
            "kind": Kind.API_KEY.value,
            "state": ConnState.ACTIVE.value,
            SECRET_FIELD: self.box.seal({"api_key": api_key.strip()}),
            **plan_fields(limits or {}),
        }
        self._write(name, fields, clear=("reason", "access_expires_at", "refreshed_at", *PLAN_FIELDS))
        self.redis.zrem(CONNECTIONS_REFRESHED_KEY, name)
        return self._info(name)

    def add_oauth(
        self,
        name: str,
        refresh_token: str,
        access_token: str = "",
        expires_in: float = 0.0,
        limits: Mapping[str, object] | None = None,
    ) -> ConnectionInfo:
        """A new grant (imported, or just obtained): the connection is active again."""
        check_name(name)
        if not refresh_token.strip():
            raise ConfigError("refresh_token: empty")
        now = time.time()
        expires_at = now + expires_in if access_token else 0.0
        fields = {
            "kind": Kind.OAUTH.value,
            "state": ConnState.ACTIVE.value,
            SECRET_FIELD: self.box.seal(
                {
                    "refresh_token": refresh_token.strip(),
                    "access_token": access_token,
                    "expires_at": expires_at,
                    "lifetime": expires_in,
                }
            ),
            "access_expires_at": repr(expires_at),
            "refreshed_at": repr(now),
        }
        clear: tuple[str, ...] = ("reason",)
        if limits is not None:
            fields.update(plan_fields(limits))
            clear += PLAN_FIELDS
        self._write(name, fields, clear=clear)
        self.redis.zadd(CONNECTIONS_REFRESHED_KEY, {name: now})
        return self._info(name)

    def store_tokens(self, name: str, tokens: TokenSet) -> None:
        """A refresh's answer: new refresh and access token in one write."""
        now = time.time()
        key = connection_key(name)
        expires_at = now + tokens.expires_in
        secret = self.box.seal(
            {
                "refresh_token": tokens.refresh_token.reveal(),
                "access_token": tokens.access_token.reveal(),
                "expires_at": expires_at,
                "lifetime": tokens.expires_in,
            }
        )
        pipe = self.redis.pipeline()
        pipe.hset(
            key,
            mapping={
                SECRET_FIELD: secret,
                "access_expires_at": repr(expires_at),
                "refreshed_at": repr(now),
                "updated_at": repr(now),
            },
        )
        pipe.hincrby(key, "refreshes", 1)
        pipe.hincrby(key, "version", 1)
        pipe.zadd(CONNECTIONS_REFRESHED_KEY, {name: now})
        pipe.execute()

    def mark_needs_reconnect(self, name: str, reason: str) -> None:
        key = connection_key(name)
        pipe = self.redis.pipeline()
        pipe.hset(
            key,
            mapping={
                "state": ConnState.NEEDS_RECONNECT.value,
                "reason": reason,
                "updated_at": repr(time.time()),
            },
        )
        pipe.hincrby(key, "version", 1)
        pipe.zrem(CONNECTIONS_REFRESHED_KEY, name)
        pipe.publish(CONNECTION_CHANGES_CHANNEL, name)
        pipe.execute()

    def remove(self, name: str) -> bool:
        return remove_connection(self.redis, name)

    def rekey(self) -> int:
        """Re-encrypt every stored secret (and pending authorization) under the first key."""
        count = 0
        keys = [connection_key(n) for n in self.registry.names()]
        for key in keys:
            count += self._rotate_field(key)
        for pending in self.redis.scan_iter(match=f"{OAUTH_PENDING_PREFIX}*", count=500):
            count += self._rotate_value(pending)
        return count

    def _rotate_field(self, key: str) -> int:
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    _watch(pipe, key)
                    raw = pipe.hget(key, SECRET_FIELD)
                    if raw is None:
                        pipe.unwatch()
                        return 0
                    new = self.box.rotate(raw)
                    pipe.multi()
                    pipe.hset(key, SECRET_FIELD, new)
                    pipe.execute()
                    return 1
                except redis.WatchError:
                    continue

    def _rotate_value(self, key: Any) -> int:
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    _watch(pipe, key)
                    raw = pipe.get(key)
                    ttl = pipe.pttl(key)
                    if raw is None:
                        pipe.unwatch()
                        return 0
                    new = self.box.rotate(raw)
                    pipe.multi()
                    pipe.set(key, new, px=ttl if isinstance(ttl, int) and ttl > 0 else None)
                    pipe.execute()
                    return 1
                except redis.WatchError:
                    continue

    # -- reads -------------------------------------------------------------------------------
    def _info(self, name: str) -> ConnectionInfo:
        info = self.registry.get(name)
        assert info is not None
        return info

    def version(self, name: str) -> int | None:
        raw = self.redis.hget(connection_key(name), "version")
        return int(raw) if raw is not None else None

    def load(self, name: str) -> Connection | None:
        raw = self.redis.hgetall(connection_key(name))
        if not raw:
            return None
        h = {as_str(k): as_str(v) for k, v in raw.items()}
        kind = Kind(h.get("kind", Kind.API_KEY.value))
        secret = self.box.open(h[SECRET_FIELD]) if h.get(SECRET_FIELD) else {}
        limits = limits_from_table(
            {k: _num(h[k]) if k != "plan" else h[k] for k in PLAN_FIELDS if h.get(k)}, f"connection {name}"
        )

        def sec(k: str) -> Secret | None:
            v = secret.get(k)
            return Secret(str(v)) if v else None

        return Connection(
            name=name,
            kind=kind,
            state=ConnState(h.get("state", ConnState.ACTIVE.value)),
            limits=limits,
            version=int(h.get("version") or 0),
            api_key=sec("api_key"),
            access_token=sec("access_token"),
            refresh_token=sec("refresh_token"),
            access_expires_at=float(secret.get("expires_at") or 0),
            access_lifetime=float(secret.get("lifetime") or 0),
            share=check_share(h.get("share"), f"connection {name}.share"),
        )


def remove_connection(client: redis.Redis, name: str) -> bool:
    """Forget a connection and its secrets (needs no key)."""
    pipe = client.pipeline()
    pipe.delete(connection_key(name))
    pipe.srem(CONNECTIONS_KEY, name)
    pipe.zrem(CONNECTIONS_REFRESHED_KEY, name)
    pipe.publish(CONNECTION_CHANGES_CHANNEL, name)
    return bool(pipe.execute()[0])


def _num(raw: str) -> int | float:
    return float(raw) if "." in raw else int(raw)


def _watch(pipe: redis.client.Pipeline, key: Any) -> None:
    """WATCH `key` on `pipe` (redis-py leaves Pipeline.watch without annotations)."""
    watch: Callable[[Any], object] = pipe.watch
    watch(key)
