"""Per-block MD5s taken while staging, so a worker sends Put Blocks without hashing them.

Why: Put Block needs each block's Content-MD5 before its body, so a worker hashed every block,
and then the whole file again to prove the staged copy was still what the producer handed in:
two MD5 passes over every byte, on the machines that are busiest. The producer reads every byte
anyway while it copies a file into staging; hashing the blocks there too (in a second thread,
beside the whole-file MD5) lets the upload host check every block against what the producer read,
end to end, and the worker hashes nothing unless the host refuses a block.

The digests sit beside the job's staging folder (`<STAGING_DIR>/<job id>.block-md5`, removed
with it). They are written only for files above the single-PUT threshold, cut at the block size
the workers will use (AWORK_SINGLE_PUT_THRESHOLD and AWORK_BLOCK_SIZE, read by both sides); a
worker that finds them not matching its own block size, the file's size or its MD5 hashes as
before.
"""

from __future__ import annotations

import base64
import hashlib
import math
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

MiB = 1024 * 1024
DEFAULT_SINGLE_PUT_THRESHOLD = 64 * MiB  # as Azure's SDK
DEFAULT_BLOCK_SIZE = 8 * MiB
MAX_BLOCKS = 50_000  # Azure's limit per block blob
SUFFIX = ".block-md5"
_MAGIC = "awork-block-md5 1"


def block_size_for(size: int, block_size: int) -> int:
    """The block size actually used for `size` bytes: larger when Azure's block count would overflow."""
    if math.ceil(size / block_size) > MAX_BLOCKS:
        return math.ceil(size / MAX_BLOCKS / MiB) * MiB
    return block_size


def sidecar_path(staging_dir: Path, job_id: str) -> Path:
    return staging_dir / f"{job_id}{SUFFIX}"


@dataclass(frozen=True)
class BlockDigests:
    size: int
    block_size: int
    md5_b64: str  # of the whole file
    blocks: tuple[str, ...]  # base64 MD5 of each block, in order

    def fits(self, size: int, block_size: int, md5_b64: str | None) -> bool:
        """True when these digests describe this file cut at this block size."""
        return (
            self.size == size
            and self.block_size == block_size
            and md5_b64 is not None
            and self.md5_b64 == md5_b64
            and len(self.blocks) == math.ceil(size / block_size)
        )

    def dump(self) -> str:
        head = [_MAGIC, f"size {self.size}", f"block_size {self.block_size}", f"md5 {self.md5_b64}"]
        return "\n".join([*head, *self.blocks]) + "\n"

    @classmethod
    def parse(cls, text: str) -> BlockDigests | None:
        """None for anything malformed: the worker then hashes the blocks itself."""
        lines = text.splitlines()
        try:
            if lines[0] != _MAGIC:
                return None
            size = int(_value(lines[1], "size"))
            block_size = int(_value(lines[2], "block_size"))
            md5 = _value(lines[3], "md5")
        except (IndexError, ValueError):
            return None
        blocks = tuple(lines[4:])
        if size <= 0 or block_size <= 0 or not all(len(b) == 24 for b in (md5, *blocks)):
            return None
        return cls(size, block_size, md5, blocks)

    @classmethod
    def load(cls, path: Path) -> BlockDigests | None:
        try:
            return cls.parse(path.read_text(encoding="ascii"))
        except (OSError, UnicodeDecodeError):
            return None


def _value(line: str, key: str) -> str:
    name, _, value = line.partition(" ")
    if name != key or not value:
        raise ValueError(line)
    return value


class BlockHasher:
    """MD5 per `block_size` bytes of a stream fed in chunks of any size, in a helper thread.

    `update` hands the chunk over and returns at once (the previous chunk must be done first, so
    at most one chunk is in the thread); hashlib releases the GIL, so the caller's own work (the
    whole-file MD5, the copy) runs at the same time.
    """

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._digests: list[str] = []
        self._current = hashlib.md5(usedforsecurity=False)
        self._filled = 0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="block-md5")
        self._pending: Future[None] | None = None

    def _feed(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        while view:
            take = min(len(view), self.block_size - self._filled)
            self._current.update(view[:take])
            self._filled += take
            view = view[take:]
            if self._filled == self.block_size:
                self._close_block()

    def _close_block(self) -> None:
        self._digests.append(base64.b64encode(self._current.digest()).decode("ascii"))
        self._current = hashlib.md5(usedforsecurity=False)
        self._filled = 0

    def update(self, chunk: bytes) -> None:
        if self._pending is not None:
            self._pending.result()
        self._pending = self._pool.submit(self._feed, chunk)

    def finish(self) -> tuple[str, ...]:
        try:
            if self._pending is not None:
                self._pending.result()
            if self._filled:
                self._close_block()
            return tuple(self._digests)
        finally:
            self._pool.shutdown(wait=True)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
