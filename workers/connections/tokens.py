"""Connections as a worker uses them: loaded on first use, cached briefly, OAuth tokens refreshed
single-flight across the fleet.

Why each rule (awork's refresh tokens are single-use, so two refreshes with one token lose the
grant's next answer to `invalid_grant`):
- one refresh per connection at a time, fleet-wide: a Redis lock (SET NX PX, released only by
  its holder);
- the stored tokens are re-read once the lock is held: a sibling may have refreshed meanwhile;
- refresh ahead of expiry (a tenth of the lifetime, at most 5 minutes), so requests never go out
  with a token about to lapse;
- on `invalid_grant`, re-read first: if the stored refresh token changed (a new grant was
  added), that one is used; only an unchanged token means the grant is dead (`needs_reconnect`);
- new refresh and access token are stored in one write (ConnectionStore.store_tokens).

Memory does not grow with the number of registered connections: the cache holds at most
CACHE_MAX entries and checks an entry's `version` (one HGET) once it is older than `ttl`.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import redis

from producers.connections import REFRESHED_KEY, ConnState, Kind, refresh_lock_key
from workers.connections.oauth import InvalidGrant, OAuthClient
from workers.connections.store import Connection, ConnectionStore
from workers.errors import PermanentError, TransientError
from workers.settings import Secret

log = logging.getLogger("awork.connections")

CACHE_MAX = 256
LOCK_TTL_MS = 30_000
LOCK_WAIT_SECONDS = 35.0
AHEAD_MAX_SECONDS = 300.0
AHEAD_SHARE = 0.1
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


class NeedsReconnect(Exception):
    """The connection's grant is dead: its jobs wait for the customer (`waiting_for_connection`)."""

    def __init__(self, name: str, reason: str = "") -> None:
        super().__init__(f"connection {name!r} needs to be connected again ({reason or 'needs_reconnect'})")
        self.name = name
        self.reason = reason


class UnknownConnection(PermanentError):
    """No connection of that name (removed while its job waited, or never added)."""


def refresh_ahead(lifetime: float) -> float:
    return min(AHEAD_MAX_SECONDS, max(0.0, lifetime) * AHEAD_SHARE)


@dataclass
class _Entry:
    conn: Connection
    checked: float


class Connections:
    """Per worker process: the cache and the token manager."""

    def __init__(
        self,
        store: ConnectionStore,
        oauth: OAuthClient | None,
        ttl: float = 5.0,
    ) -> None:
        self.store = store
        self.oauth = oauth
        self.ttl = ttl
        self._cache: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._release = store.redis.register_script(_RELEASE)
        self.refreshes = 0  # by this process (tests, benchmarks)
        self.refresh_seconds: list[float] = []

    # -- the cache ---------------------------------------------------------------------------
    def get(self, name: str) -> Connection | None:
        now = time.monotonic()
        with self._lock:
            entry = self._cache.get(name)
            if entry is not None and now - entry.checked < self.ttl:
                self._cache.move_to_end(name)
                return entry.conn
        if entry is not None and self.store.version(name) == entry.conn.version:
            with self._lock:
                entry.checked = now
            return entry.conn
        conn = self.store.load(name)
        self._put(conn, name)
        return conn

    def _put(self, conn: Connection | None, name: str) -> None:
        with self._lock:
            if conn is None:
                self._cache.pop(name, None)
                return
            self._cache[name] = _Entry(conn, time.monotonic())
            self._cache.move_to_end(name)
            while len(self._cache) > CACHE_MAX:
                self._cache.popitem(last=False)

    def forget(self, name: str) -> None:
        with self._lock:
            self._cache.pop(name, None)

    def cached_count(self) -> int:
        return len(self._cache)

    # -- tokens ------------------------------------------------------------------------------
    def bearer(self, name: str) -> Secret:
        """The token to send now; refreshes an OAuth token that is at (or near) its expiry."""
        conn = self.get(name)
        if conn is None:
            raise UnknownConnection(f"connection {name!r} is not registered", code="connection-unknown")
        if conn.state is ConnState.NEEDS_RECONNECT:
            raise NeedsReconnect(name, "needs_reconnect")
        if conn.kind is Kind.API_KEY:
            if conn.api_key is None:
                raise PermanentError(f"connection {name!r} has no API key", code="connection-broken")
            return conn.api_key
        if conn.access_token is not None and not self._stale(conn):
            return conn.access_token
        return self.refresh(name, conn.access_token)

    def _stale(self, conn: Connection) -> bool:
        return conn.access_expires_at - time.time() <= refresh_ahead(conn.access_lifetime)

    def refresh(self, name: str, seen: Secret | None) -> Secret:
        """A fresh access token, refreshing the grant unless a sibling already did.

        `seen` is the token the caller holds (or that awork just refused): a stored token that
        differs from it and is not stale is taken as is.
        """
        fresh = self._usable_other(self.store.load(name), seen, name)
        if fresh is not None:
            return fresh
        if self.oauth is None:
            raise PermanentError(
                "OAuth connection but AWORK_OAUTH_CLIENT_ID / _SECRET are not set on this worker",
                code="oauth-client-missing",
            )
        token = secrets.token_hex(16)
        lock = refresh_lock_key(name)
        deadline = time.monotonic() + LOCK_WAIT_SECONDS
        while not self.store.redis.set(lock, token, nx=True, px=LOCK_TTL_MS):
            if time.monotonic() > deadline:
                raise TransientError(f"connection {name!r}: refresh lock held too long")
            time.sleep(0.02)
        try:
            current = self.store.load(name)  # re-read under the lock
            fresh = self._usable_other(current, seen, name)
            if fresh is not None:
                return fresh
            assert current is not None
            return self._refresh_grant(name, current)
        finally:
            try:
                self._release(keys=[lock], args=[token])
            except redis.RedisError:
                log.debug("could not release the refresh lock of %s", name, exc_info=True)

    def _refresh_grant(self, name: str, current: Connection) -> Secret:
        """Ask awork for new tokens with `current`'s refresh token (the refresh lock is held)
        and store them; a refused grant marks the connection needs_reconnect."""
        assert self.oauth is not None and current.refresh_token is not None
        started = time.monotonic()
        try:
            tokens = self.oauth.refresh(current.refresh_token)
        except InvalidGrant:
            again = self.store.load(name)
            if (
                again is not None
                and again.refresh_token is not None
                and again.refresh_token.reveal() != current.refresh_token.reveal()
            ):
                # a new grant arrived while we asked: use it next time round
                self._put(again, name)
                raise TransientError(f"connection {name!r}: grant replaced during refresh") from None
            self.store.mark_needs_reconnect(name, "invalid_grant")
            self.forget(name)
            log.warning(
                "connection=%s state=needs_reconnect reason=invalid_grant: the customer must "
                "connect again (awork-uploads connections oauth-url %s ...)",
                name,
                name,
            )
            raise NeedsReconnect(name, "invalid_grant") from None
        self.store.store_tokens(name, tokens)
        self.refreshes += 1
        self.refresh_seconds.append(time.monotonic() - started)
        del self.refresh_seconds[:-1000]
        log.info("connection=%s refreshed expires_in=%s", name, int(tokens.expires_in))
        self._put(self.store.load(name), name)
        return tokens.access_token

    def _usable_other(self, conn: Connection | None, seen: Secret | None, name: str) -> Secret | None:
        if conn is None:
            self.forget(name)
            raise UnknownConnection(f"connection {name!r} is not registered", code="connection-unknown")
        if conn.state is ConnState.NEEDS_RECONNECT:
            self._put(conn, name)
            raise NeedsReconnect(name, "needs_reconnect")
        tok = conn.access_token
        if tok is None or self._stale(conn):
            return None
        if seen is not None and tok.reveal() == seen.reveal():
            return None
        self._put(conn, name)
        return tok

    # -- keepalive ---------------------------------------------------------------------------
    def keepalive(self, older_than: float, limit: int = 50) -> int:
        """Refresh OAuth grants not refreshed for `older_than` seconds (a refresh token expires
        after 30 days unused); returns how many were refreshed."""
        cutoff = time.time() - older_than
        names = self.store.redis.zrangebyscore(REFRESHED_KEY, "-inf", cutoff, start=0, num=limit)
        done = 0
        for raw in names:
            name = raw.decode() if isinstance(raw, bytes) else str(raw)
            conn = self.store.load(name)
            if conn is None or conn.kind is not Kind.OAUTH or conn.state is not ConnState.ACTIVE:
                self.store.redis.zrem(REFRESHED_KEY, name)
                continue
            try:
                self.refresh(name, conn.access_token if conn.access_token else None)
                done += 1
            except NeedsReconnect:
                continue
            except Exception:
                log.warning("keepalive refresh of %s failed", name, exc_info=True)
        return done
