"""What a transfer is: the policy it follows, the state one `upload()` call shares, what it put."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from producers.block_digests import DEFAULT_BLOCK_SIZE, DEFAULT_SINGLE_PUT_THRESHOLD, block_size_for
from producers.source_url import SourceAddress
from workers.blob.progress import Progress
from workers.block_journal import BlockJournal

MiB = 1024 * 1024
MAX_BLOCK_SIZE = 4000 * MiB
MAX_SINGLE_PUT = 5000 * MiB


@dataclass(frozen=True)
class TransferPolicy:
    """How a transfer is cut up and retried. Defaults follow Azure's SDK."""

    single_put_threshold: int = DEFAULT_SINGLE_PUT_THRESHOLD
    block_size: int = DEFAULT_BLOCK_SIZE
    parallel_blocks: int = 4
    block_retries: int = 4  # retries per request (block, block list, single PUT) in this call
    connect_timeout: float = 10.0
    read_timeout: float = 120.0
    retry_backoff: float = 0.5  # full jitter: sleep uniform(0, min(max, backoff * 2**attempt))
    retry_backoff_max: float = 20.0
    progress_interval: float = 0.25  # at most ~4 progress calls a second (plus the last one)
    source_restarts: int = 2  # a source stream broken beyond repair restarts the pass this often

    def __post_init__(self) -> None:
        if not 0 < self.block_size <= MAX_BLOCK_SIZE:
            raise ValueError(f"block_size must be in (0, {MAX_BLOCK_SIZE}]")
        if not 0 <= self.single_put_threshold <= MAX_SINGLE_PUT:
            raise ValueError(f"single_put_threshold must be in [0, {MAX_SINGLE_PUT}]")
        if self.parallel_blocks < 1 or self.block_retries < 0:
            raise ValueError("parallel_blocks must be >= 1 and block_retries >= 0")

    @property
    def timeout(self) -> tuple[float, float]:
        return (self.connect_timeout, self.read_timeout)

    def block_size_of(self, size: int | None) -> int:
        """The block size for a source of `size` bytes (bigger blocks past MAX_BLOCKS of the default)."""
        return self.block_size if size is None else block_size_for(size, self.block_size)


@dataclass(frozen=True)
class UploadCall:
    """What every route and request of one `upload()` call shares, instead of passing it along."""

    url: str  # the pre-signed upload URL: a credential, never logged
    target: SourceAddress  # its checked host:port
    content_type: str
    journal: BlockJournal
    tracker: Progress


@dataclass(frozen=True)
class UploadOutcome:
    """What was put: the caller records it in the job record."""

    size: int
    md5_b64: str
    mode: Literal["single", "blocks"]
    blocks_sent: int = 0
    blocks_skipped: int = 0  # acknowledged by an earlier attempt (journal) and not sent again
    retries: int = 0  # requests repeated inside this call (transient errors, MD5 mismatches)
    fell_back: bool = False  # the host refused blocks (now or earlier): one Put Blob instead
    staged_block_md5s: bool = False  # blocks sent with staging's MD5s: nothing hashed here
