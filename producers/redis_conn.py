"""Every Redis client of the fleet is made here, from REDIS_URL: one Redis, or Redis Sentinel.

`REDIS_URL=redis://...` (or rediss://, unix://) is one Redis. Sentinel is written the way
Celery and kombu write it: every sentinel its own URL, joined by `;`, with the name of the
monitored master and, where the sentinels have one, their password in their own variables:

    REDIS_URL=sentinel://:masterpass@10.0.0.1:26379/0;sentinel://10.0.0.2:26379;sentinel://10.0.0.3:26379
    REDIS_SENTINEL_MASTER=mymaster
    REDIS_SENTINEL_PASSWORD=...            # only when the sentinels ask for one

The password in the URL is the master's (as in kombu's sentinel transport). A sentinel client
asks the sentinels for the master's address on every new connection, so after a failover it
finds the promoted replica by itself. While the failover runs (the old master is gone, no
replica promoted yet) a command meets connection errors: `redis_client` retries them with a
short backoff for about `AWORK_REDIS_FAILOVER_SECONDS` (default 20), then the error goes up as
before. What asynchronous replication dropped in that window (the last writes of the old
master) is covered by the idempotent steps and the sweeper, as after any lost write.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.asyncio.sentinel import SentinelManagedConnection as AsyncSentinelManagedConnection
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelManagedConnection

from producers.config import ConfigError, env_float

URL_ENV = "REDIS_URL"
MASTER_ENV = "REDIS_SENTINEL_MASTER"
SENTINEL_PASSWORD_ENV = "REDIS_SENTINEL_PASSWORD"
FAILOVER_ENV = "AWORK_REDIS_FAILOVER_SECONDS"
SINGLE_SCHEMES = ("redis", "rediss", "unix")
SENTINEL_SCHEME = "sentinel"
DEFAULT_SENTINEL_PORT = 26379
DEFAULT_FAILOVER_SECONDS = 20.0
# Backoff between tries while the master is away: 50 ms doubling up to this cap.
BACKOFF_CAP_SECONDS = 0.5
_BACKOFF_BASE_SECONDS = 0.05


@dataclass(frozen=True)
class SentinelTarget:
    """Where a sentinel REDIS_URL points: the sentinels, the master's name, db and passwords."""

    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    username: str | None = None
    password: str | None = None  # the master's (and its replicas')
    sentinel_password: str | None = None

    def __repr__(self) -> str:  # passwords never show
        hosts = ",".join(f"{h}:{p}" for h, p in self.sentinels)
        return f"SentinelTarget({hosts}, master={self.master!r}, db={self.db})"


def is_sentinel(url: str) -> bool:
    return url.strip().lower().startswith(SENTINEL_SCHEME + "://")


def check_redis_url(url: str, env: Mapping[str, str] | None = None) -> None:
    """Raise ConfigError naming the variable when REDIS_URL (or its sentinel settings) is wrong."""
    scheme = urlsplit(url.split(";", 1)[0]).scheme
    if is_sentinel(url):
        sentinel_target(url, env)
        return
    if scheme not in SINGLE_SCHEMES:
        raise ConfigError(
            f"{URL_ENV}: expected redis://, rediss://, unix:// or sentinel://host:port;sentinel://...,"
            f" got a {scheme or 'schemeless'} URL"
        )


def sentinel_target(url: str, env: Mapping[str, str] | None = None) -> SentinelTarget:
    """Parse a `sentinel://...;sentinel://...` URL plus REDIS_SENTINEL_MASTER / _PASSWORD."""
    environ = os.environ if env is None else env
    hosts: list[tuple[str, int]] = []
    db, username, password = 0, None, None
    for n, part in enumerate(p.strip() for p in url.split(";")):
        if not part:
            continue
        try:
            parts = urlsplit(part)
            port = parts.port or DEFAULT_SENTINEL_PORT
        except ValueError:
            raise ConfigError(f"{URL_ENV}: sentinel {n + 1} has a bad port") from None
        if parts.scheme != SENTINEL_SCHEME or not parts.hostname:
            raise ConfigError(
                f"{URL_ENV}: every `;`-separated part must be sentinel://host:port (part {n + 1} is not)"
            )
        hosts.append((parts.hostname, port))
        path = parts.path.strip("/")
        if path:
            if not path.isdigit():
                raise ConfigError(f"{URL_ENV}: the database must be a number, got /{path}")
            db = int(path)
        if parts.password is not None and password is None:
            password = unquote(parts.password)
            username = unquote(parts.username) if parts.username else None
    if not hosts:
        raise ConfigError(f"{URL_ENV}: no sentinel in the URL")
    master = environ.get(MASTER_ENV, "").strip()
    if not master:
        raise ConfigError(f"{MASTER_ENV}: not set (the name the sentinels monitor, e.g. mymaster)")
    sentinel_password = environ.get(SENTINEL_PASSWORD_ENV, "").strip() or None
    return SentinelTarget(tuple(hosts), master, db, username, password, sentinel_password)


def failover_seconds() -> float:
    """AWORK_REDIS_FAILOVER_SECONDS: how long a command keeps trying while a failover runs."""
    return max(0.0, env_float(FAILOVER_ENV, DEFAULT_FAILOVER_SECONDS))


def _retries(budget: float) -> int:
    """Tries whose backoff (50 ms doubling, capped at 0.5 s) adds up to about `budget` seconds."""
    slept, n, wait = 0.0, 0, _BACKOFF_BASE_SECONDS
    while slept < budget:
        slept += min(BACKOFF_CAP_SECONDS, wait)
        wait *= 2
        n += 1
    return n


def failover_retry() -> Retry:
    """The bounded retry of a sentinel client: connection and timeout errors only."""
    return Retry(
        ExponentialBackoff(cap=BACKOFF_CAP_SECONDS, base=_BACKOFF_BASE_SECONDS),
        _retries(failover_seconds()),
    )


class FailoverConnection(SentinelManagedConnection):
    """A master connection that asks the sentinels again whenever it reconnects.

    redis-py (8.x) reconnects a connection that dropped *during* a command (the retry sends the
    command again on the same connection object) through `connect_check_health`, with the
    address it had: the dead master's, for the whole retry budget, although the replica was
    promoted seconds after the kill. Only `connect()` looks the master up; this makes the other
    path look it up too, and leaves the retrying to the command's own (bounded) retry."""

    def connect_check_health(self, check_health: bool = True, retry_socket_connect: bool = True) -> None:
        if not self._sock and retry_socket_connect and self.connection_pool.is_master:
            self.host, self.port = self.connection_pool.get_master_address()
            retry_socket_connect = False
        super().connect_check_health(check_health=check_health, retry_socket_connect=retry_socket_connect)


class AsyncFailoverConnection(AsyncSentinelManagedConnection):
    """`FailoverConnection` for redis.asyncio (the same reconnect path)."""

    async def connect_check_health(
        self, check_health: bool = True, retry_socket_connect: bool = True
    ) -> None:
        if not self.is_connected and retry_socket_connect and self.connection_pool.is_master:
            self.host, self.port = await self.connection_pool.get_master_address()
            retry_socket_connect = False
        await super().connect_check_health(
            check_health=check_health, retry_socket_connect=retry_socket_connect
        )


def _sentinel_kwargs(target: SentinelTarget, kwargs: Mapping[str, Any], retry: object) -> dict[str, Any]:
    """What the connections *to the sentinels* get: the same socket bounds, their password, and
    no retry of their own (the master client's failover retry asks them all again; redis-py's
    default would sleep up to 7 s per sentinel, for a wrong password too)."""
    out: dict[str, Any] = {k: v for k, v in kwargs.items() if k.startswith("socket_")}
    out["retry"] = retry
    if target.sentinel_password:
        out["password"] = target.sentinel_password
    return out


def _master_kwargs(target: SentinelTarget, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(kwargs)
    out.setdefault("db", target.db)
    if target.password is not None:
        out.setdefault("password", target.password)
    if target.username is not None:
        out.setdefault("username", target.username)
    return out


def redis_client(url: str, **kwargs: Any) -> redis.Redis:
    """A client of the fleet's Redis. `kwargs` as for `redis.Redis` (timeouts, decode_responses).

    With a sentinel URL: the current master, found again after a failover, with the bounded
    failover retry (unless `retry` is given)."""
    if not is_sentinel(url):
        return redis.Redis.from_url(url, **kwargs)
    target = sentinel_target(url)
    master = _master_kwargs(target, kwargs)
    master.setdefault("retry", failover_retry())
    master.setdefault("connection_class", FailoverConnection)
    ask_once = _sentinel_kwargs(target, kwargs, Retry(NoBackoff(), 0))
    sentinel = Sentinel(list(target.sentinels), sentinel_kwargs=ask_once)
    return sentinel.master_for(target.master, redis_class=redis.Redis, **master)


def async_redis_client(url: str, **kwargs: Any) -> aioredis.Redis:
    """The asyncio twin of `redis_client` (the intake's read path)."""
    if not is_sentinel(url):
        return aioredis.Redis.from_url(url, **kwargs)
    target = sentinel_target(url)
    master = _master_kwargs(target, kwargs)
    master.setdefault(
        "retry",
        AsyncRetry(
            ExponentialBackoff(cap=BACKOFF_CAP_SECONDS, base=_BACKOFF_BASE_SECONDS),
            _retries(failover_seconds()),
        ),
    )
    master.setdefault("connection_class", AsyncFailoverConnection)
    ask_once = _sentinel_kwargs(target, kwargs, AsyncRetry(NoBackoff(), 0))
    sentinel = AsyncSentinel(list(target.sentinels), sentinel_kwargs=ask_once)
    return sentinel.master_for(target.master, redis_class=aioredis.Redis, **master)


def broker_sentinel_options(url: str) -> dict[str, Any]:
    """kombu's sentinel transport options for this URL: master_name, and sentinel_kwargs with
    the sentinels' password. Empty for a plain Redis URL."""
    if not is_sentinel(url):
        return {}
    target = sentinel_target(url)
    options: dict[str, Any] = {"master_name": target.master}
    if target.sentinel_password:
        options["sentinel_kwargs"] = {"password": target.sentinel_password}
    return options


__all__ = [
    "SentinelTarget",
    "async_redis_client",
    "broker_sentinel_options",
    "check_redis_url",
    "failover_retry",
    "is_sentinel",
    "redis_client",
    "sentinel_target",
]
