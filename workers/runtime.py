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

from producers.records import JobStore
from workers.awork_client import AworkClient
from workers.blob import BlobUploader, RedisFallbackStore
from workers.ratelimit import RateLimiter
from workers.settings import WorkerSettings, transfer_policy_from_env
from workers.step_lock import StepLocks

log = logging.getLogger("awork.runtime")
# "off" runs without the shared limiter: for the comparison in ops/bench/ratelimit_fleet.py only.
RATE_LIMITER_ENV = "AWORK_RATE_LIMITER"


@dataclass
class Runtime:
    settings: WorkerSettings
    _clients: dict[str, AworkClient] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @cached_property
    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(
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
            transfer_policy_from_env(),
            fallback_store=RedisFallbackStore(self.redis),
        )

    def client(self, workspace: str) -> AworkClient:
        """The workspace's API client; every response feeds the shared limiter."""
        with self._lock:
            existing = self._clients.get(workspace)
            if existing is not None:
                return existing
            ws = self.settings.workspace(workspace)

            def observe(status: int, headers: Mapping[str, str], elapsed: float) -> None:
                # The request has happened: a limiter failure here must not turn its answer
                # into an error (a link or multipart upload would then look lost). The next
                # take_token() meets a Redis outage and fails closed.
                try:
                    self.limiter.observe(ws.name, ws.limits, status, headers, elapsed=elapsed)
                except Exception:
                    log.warning("rate limiter: could not observe a %s response", status, exc_info=True)

            client = AworkClient(
                ws.api_url,
                ws.api_key,
                self.settings.connect_timeout,
                self.settings.read_timeout,
                on_response=observe if self.limiter_enabled else None,
            )
            self._clients[workspace] = client
            return client


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
