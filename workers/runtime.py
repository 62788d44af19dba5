"""Per-process resources the steps share: settings, Redis, the job store, limiter, clients.

Built lazily on first use so importing the app (as Flower or `celery inspect` do) needs no keys.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property

import redis

from producers.config import ConfigError
from producers.records import JobStore
from producers.redis_conn import redis_client
from workers.awork_client import AworkClient, TokenSource, Unauthorized
from workers.blob import BlobUploader, RedisFallbackStore
from workers.connections.settings import ConnectionSettings
from workers.connections.store import ConnectionStore
from workers.connections.tokens import Connections, UnknownConnection
from workers.fair_share import FairSettings, FairShare
from workers.limits_config import WorkspaceLimits
from workers.ratelimit import RateLimiter
from workers.settings import Secret, WorkerSettings
from workers.step_lock import LOCK_TTL_SECONDS, StepLocks

log = logging.getLogger("awork.runtime")
# "off" runs without the shared limiter: for the comparison in ops/bench/ratelimit_fleet.py only.
RATE_LIMITER_ENV = "AWORK_RATE_LIMITER"
# API clients kept per process (one per workspace recently used), whatever the registry's size.
MAX_CLIENTS = 256


@dataclass
class Runtime:
    settings: WorkerSettings
    _clients: dict[str, AworkClient] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @cached_property
    def redis(self) -> redis.Redis:
        return redis_client(
            self.settings.shared.redis_url,
            socket_connect_timeout=5,
            socket_timeout=30,
            health_check_interval=10,
            retry_on_timeout=True,
        )

    @cached_property
    def store(self) -> JobStore:
        return JobStore(self.redis, self.settings.shared.record_ttl_seconds)

    @cached_property
    def locks(self) -> StepLocks:
        return StepLocks(self.redis)

    @cached_property
    def fair(self) -> FairShare:
        """The fleet's transfer slots shared across workspaces (AWORK_FAIR_SHARE)."""
        return FairShare(self.redis, LOCK_TTL_SECONDS, FairSettings.from_env())

    def share(self, workspace: str) -> float:
        """The workspace's weight: `share` in its table, else in its registered connection."""
        if self.is_static(workspace):
            return self.settings.workspace(workspace).share
        conn = self.connections.get(workspace) if self.connections is not None else None
        return conn.share if conn is not None else 1.0

    @cached_property
    def limiter(self) -> RateLimiter:
        return RateLimiter(self.redis)

    @cached_property
    def limiter_enabled(self) -> bool:
        """False only with AWORK_RATE_LIMITER=off (a benchmark switch, never for production:
        no tokens, no 429 pause, no learning; each job then retries its own 429s)."""
        if os.environ.get(RATE_LIMITER_ENV, "").strip().lower() == "off":
            log.warning("%s=off: the fleet-wide rate limiter is disabled in this worker", RATE_LIMITER_ENV)
            return False
        return True

    @cached_property
    def uploader(self) -> BlobUploader:
        # The fleet learns together which upload hosts refuse block uploads.
        return BlobUploader(
            self.settings.upload_hosts,
            self.settings.transfer,
            fallback_store=RedisFallbackStore(self.redis),
        )

    @cached_property
    def connection_settings(self) -> ConnectionSettings:
        return ConnectionSettings.from_env(self.settings.api_url)

    @cached_property
    def connections(self) -> Connections | None:
        """The registry's connections, or None on a worker without AWORK_SECRETS_KEY."""
        cs = self.connection_settings
        if cs.box is None:
            return None
        return Connections(ConnectionStore(self.redis, cs.box), cs.oauth, ttl=cs.cache_seconds)

    def is_static(self, workspace: str) -> bool:
        """Served from AWORK_WORKSPACES_FILE / AWORK_API_KEY rather than the registry."""
        return workspace in self.settings.workspaces

    def registry(self) -> Connections:
        conns = self.connections
        if conns is None:
            raise ConfigError(
                "AWORK_SECRETS_KEY: not set on this worker, so it cannot use registered connections"
            )
        return conns

    def limits(self, workspace: str) -> WorkspaceLimits:
        """The workspace's plan limits: its table in the file, else its registered connection."""
        if self.is_static(workspace):
            return self.settings.workspace(workspace).limits
        conn = self.registry().get(workspace)
        if conn is None:
            raise UnknownConnection(f"connection {workspace!r} is not registered", code="connection-unknown")
        return conn.limits

    def client(self, workspace: str) -> AworkClient:
        """The workspace's API client; every response feeds the shared limiter."""
        with self._lock:
            existing = self._clients.get(workspace)
            if existing is not None:
                return existing
        # A registered connection's requests go to AWORK_API_URL, checked at start.
        api_url = self.settings.api_url
        on_unauthorized: Unauthorized | None = None
        key: TokenSource
        if self.is_static(workspace):
            ws = self.settings.workspace(workspace)
            key, api_url = ws.api_key, ws.api_url
        else:
            conns = self.registry()
            conn = conns.get(workspace)
            if conn is None:
                raise UnknownConnection(
                    f"connection {workspace!r} is not registered", code="connection-unknown"
                )

            def key() -> Secret:
                return conns.bearer(workspace)

            def on_unauthorized(seen: Secret) -> Secret | None:
                c = conns.get(workspace)
                if c is None or c.kind.value != "oauth":
                    return None
                return conns.refresh(workspace, seen)

        def observe(status: int, headers: Mapping[str, str], elapsed: float) -> None:
            # The request has happened: a limiter failure here must not turn its answer
            # into an error (a link or multipart upload would then look lost). The next
            # take_token() meets a Redis outage and fails closed.
            try:
                self.limiter.observe(workspace, self.limits(workspace), status, headers, elapsed=elapsed)
            except Exception:
                log.warning("rate limiter: could not observe a %s response", status, exc_info=True)

        client = AworkClient(
            api_url,
            key,
            self.settings.connect_timeout,
            self.settings.read_timeout,
            on_response=observe if self.limiter_enabled else None,
            on_unauthorized=on_unauthorized,
        )
        with self._lock:
            self._clients.setdefault(workspace, client)
            while len(self._clients) > MAX_CLIENTS:
                self._clients.pop(next(iter(self._clients)))
            return self._clients[workspace]


_runtime: Runtime | None = None
_runtime_lock = threading.Lock()


def runtime() -> Runtime:
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            _runtime = Runtime(WorkerSettings.from_env())
        return _runtime


def reset_runtime() -> None:
    """Forget the cached runtime (after a fork, or in tests that change the environment)."""
    global _runtime
    with _runtime_lock:
        _runtime = None
