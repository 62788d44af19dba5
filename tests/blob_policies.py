"""Transfer policies for the blob tests: small thresholds and blocks keep test files small."""

from __future__ import annotations

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
