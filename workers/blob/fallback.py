"""The memory of upload hosts that refuse block operations, so later uploads skip the attempt."""

from __future__ import annotations

import threading
from typing import Any, Protocol, runtime_checkable

from producers.keys import blob_host_no_blocks_key


@runtime_checkable
class FallbackStore(Protocol):
    """Remembers upload hosts that refuse block operations, so later uploads skip the attempt."""

    def refuses_blocks(self, host: str) -> bool: ...

    def remember_refusal(self, host: str, reason: str) -> None: ...


class MemoryFallbackStore:
    """Process-level memory (the default)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._hosts: dict[str, str] = {}

    def refuses_blocks(self, host: str) -> bool:
        with self._lock:
            return host.lower() in self._hosts

    def remember_refusal(self, host: str, reason: str) -> None:
        with self._lock:
            self._hosts[host.lower()] = reason


PROCESS_FALLBACKS = MemoryFallbackStore()


class RedisFallbackStore:
    """Fleet-wide memory in Redis (`awork:blobhost:{host}:no-blocks`), cached in this process.

    Expires after `ttl` so a host that starts accepting blocks is tried again one day.
    """

    def __init__(self, client: Any, ttl: int = 24 * 3600, local: MemoryFallbackStore | None = None) -> None:
        self.client = client
        self.ttl = ttl
        self.local = local or MemoryFallbackStore()

    @staticmethod
    def key(host: str) -> str:
        return blob_host_no_blocks_key(host)

    def refuses_blocks(self, host: str) -> bool:
        if self.local.refuses_blocks(host):
            return True
        reason = self.client.get(self.key(host))
        if reason is None:
            return False
        self.local.remember_refusal(host, reason.decode() if isinstance(reason, bytes) else reason)
        return True

    def remember_refusal(self, host: str, reason: str) -> None:
        self.local.remember_refusal(host, reason)
        self.client.set(self.key(host), reason[:200], ex=self.ttl)
