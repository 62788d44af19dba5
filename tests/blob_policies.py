"""Transfer policies for the blob tests: small thresholds and blocks keep test files small."""

from __future__ import annotations

import base64
import hashlib

from producers.block_digests import BlockDigests
from workers.blob import TransferPolicy

KiB = 1024
MiB = 1024 * KiB
SMALL = TransferPolicy(
    single_put_threshold=1 * MiB,
    block_size=256 * KiB,
    parallel_blocks=4,
    block_retries=3,
    retry_backoff=0.01,
    retry_backoff_max=0.05,
)


def staged_digests(data: bytes, block_size: int = SMALL.block_size) -> BlockDigests:
    """What staging records for `data` cut at `block_size` (producers.block_digests)."""

    def md5(b: bytes) -> str:
        return base64.b64encode(hashlib.md5(b).digest()).decode()

    blocks = tuple(md5(data[i : i + block_size]) for i in range(0, len(data), block_size))
    return BlockDigests(len(data), block_size, md5(data), blocks)
