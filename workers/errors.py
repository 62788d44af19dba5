"""How a failed call is classified: retry it, fail the job, or go back for a new upload URL."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(eq=False)
class AworkError(Exception):
    """An error with awork's (or Azure's) details kept for the job record and for support."""

    message: str
    status: int | None = None
    code: str | None = None
    trace_id: str | None = None
    details: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        bits = [self.message]
        if self.status is not None:
            bits.append(f"status={self.status}")
        if self.code:
            bits.append(f"code={self.code}")
        if self.trace_id:
            bits.append(f"trace_id={self.trace_id}")
        return " ".join(bits)


@dataclass(eq=False)
class TransientError(AworkError):
    """Worth retrying: 429, 5xx, timeouts, dropped connections, concurrency conflicts.

    `retry_after` (seconds) is set when the server said how long to wait.
    """

    retry_after: float | None = None


@dataclass(eq=False)
class PermanentError(AworkError):
    """Retrying cannot help (400, 401, 403, 404): the job fails at once."""


@dataclass(eq=False)
class UploadUrlExpired(AworkError):
    """The upload URL is past its `se=` expiry or its signature was refused: get a new one."""


@dataclass(eq=False)
class RateLimited(TransientError):
    """The workspace is over awork's limit (429) or our own limiter says wait."""
