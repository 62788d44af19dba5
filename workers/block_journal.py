"""Where acknowledged blocks are recorded, so a retried or redelivered put_file resumes.

Azure keeps uncommitted blocks for a week. If a worker dies at 90% of a block upload, the next
attempt (a Celery retry, or a redelivery after a SIGKILL) reads which blocks the server already
acknowledged and sends only the rest. A journal is bound to one *upload identity* (a hash of the
upload URL's host and path, plus the block size; never the URL itself, whose query is a write
credential): acks recorded for another blob are not trusted.
"""

from __future__ import annotations

import threading
from typing import Any, Protocol, runtime_checkable

from producers.keys import block_journal_key

# A week is what Azure keeps uncommitted blocks; the upload URL rarely lives that long, so acks
# older than two days are not worth trusting (or storing).
DEFAULT_TTL_SECONDS = 2 * 24 * 3600
_KEY_FIELD = "_upload"  # base64 block ids never contain "_", so no clash with a block id


@runtime_checkable
class BlockJournal(Protocol):
    """Acknowledged block ids and their MD5s (base64) for one job's current upload."""

    def begin(self, upload_key: str) -> None:
        """Bind to this upload identity; acks recorded for a different identity are dropped."""
        ...

    def acked(self) -> dict[str, str]:
        """block id -> MD5 (base64) of every block the server acknowledged."""
        ...

    def ack(self, block_id: str, md5_b64: str) -> None:
        """Record a block the server answered 201 for."""
        ...

    def reset(self) -> None:
        """Forget everything (a new upload URL, or the server lost the uncommitted blocks)."""
        ...


class MemoryBlockJournal:
    """In-process journal: for tests, and for callers that do not need resume across processes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: str | None = None
        self._blocks: dict[str, str] = {}

    @property
    def upload_key(self) -> str | None:
        return self._key

    def begin(self, upload_key: str) -> None:
        with self._lock:
            if self._key != upload_key:
                self._blocks.clear()
                self._key = upload_key

    def acked(self) -> dict[str, str]:
        with self._lock:
            return dict(self._blocks)

    def ack(self, block_id: str, md5_b64: str) -> None:
        with self._lock:
            self._blocks[block_id] = md5_b64

    def reset(self) -> None:
        with self._lock:
            self._blocks.clear()
            self._key = None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes | bytearray) else str(value)


class RedisBlockJournal:
    """Acks in the Redis hash `producers.keys.block_journal_key`, expiring `ttl` seconds after the last ack.

    `client` is a redis-py client (either `decode_responses` setting works). Every write
    refreshes the expiry, so a long upload never loses its journal half-way.
    """

    def __init__(self, client: Any, job_id: str, ttl: int = DEFAULT_TTL_SECONDS) -> None:
        self.client = client
        self.job_id = job_id
        self.ttl = int(ttl)
        self.key = block_journal_key(job_id)

    def begin(self, upload_key: str) -> None:
        current = self.client.hget(self.key, _KEY_FIELD)
        pipe = self.client.pipeline(transaction=True)
        if current is None or _text(current) != upload_key:
            pipe.delete(self.key)
            pipe.hset(self.key, _KEY_FIELD, upload_key)
        pipe.expire(self.key, self.ttl)
        pipe.execute()

    def acked(self) -> dict[str, str]:
        raw = self.client.hgetall(self.key)
        out = {_text(k): _text(v) for k, v in raw.items()}
        out.pop(_KEY_FIELD, None)
        return out

    def ack(self, block_id: str, md5_b64: str) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(self.key, block_id, md5_b64)
        pipe.expire(self.key, self.ttl)
        pipe.execute()

    def reset(self) -> None:
        self.client.delete(self.key)


__all__ = ["DEFAULT_TTL_SECONDS", "BlockJournal", "MemoryBlockJournal", "RedisBlockJournal"]
