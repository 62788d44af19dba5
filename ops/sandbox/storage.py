"""Request bodies to disk, hashed on the fly, never held whole in memory.

The event loop only collects the chunks the socket delivers; hashing and writing happen in a
worker thread one batch at a time (hashlib and file writes release the GIL), so at most two
batches plus aiohttp's read buffer are in memory whatever the upload's size.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import StreamReader

BATCH_BYTES = 1 << 20  # hand the writer thread this much at a time
HEAD_BYTES = 16  # kept for image magic-byte checks


class BodyTooLarge(Exception):
    """More bytes arrived than the route accepts."""


class Dropped(ConnectionResetError):
    """The sandbox cut the connection on purpose (fault injection)."""


class DiskSink:
    """Append-only file with an MD5 of everything written to it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f = open(path, "wb")  # noqa: SIM115 - closed in finish()/abort()
        self._md5 = hashlib.md5()
        self._chunks: list[bytes] = []
        self._pending = 0
        self._job: asyncio.Future[Any] | None = None
        self.size = 0
        self.head = b""

    def _hash_sync(self, chunks: list[bytes]) -> None:
        update = self._md5.update
        for c in chunks:
            update(c)

    def _write_sync(self, chunks: list[bytes]) -> None:
        self._f.writelines(chunks)

    async def _submit(self) -> None:
        if self._job is not None:
            await self._job
            self._job = None
        if self._chunks:
            chunks, self._chunks, self._pending = self._chunks, [], 0
            # Hash and write in two threads at once: MD5 alone is slower than loopback.
            loop = asyncio.get_running_loop()
            self._job = asyncio.gather(
                loop.run_in_executor(None, self._hash_sync, chunks),
                loop.run_in_executor(None, self._write_sync, chunks),
            )

    async def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if len(self.head) < HEAD_BYTES:
            self.head = (self.head + chunk[:HEAD_BYTES])[:HEAD_BYTES]
        self._chunks.append(chunk)
        self._pending += len(chunk)
        if self._pending >= BATCH_BYTES:
            await self._submit()

    async def finish(self) -> bytes:
        """Flush, close, and return the MD5 digest of the whole body."""
        if self._job is None and self._pending < BATCH_BYTES:
            self._hash_sync(self._chunks)  # small body: a thread hop would cost more
            self._write_sync(self._chunks)
            self._chunks = []
        else:
            await self._submit()
            if self._job is not None:
                await self._job
                self._job = None
        self._f.close()
        return self._md5.digest()

    async def abort(self) -> None:
        """Stop, close and delete the partial file."""
        if self._job is not None:
            with contextlib.suppress(Exception):
                await self._job
            self._job = None
        self._f.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


async def receive(
    content: StreamReader,
    sink: DiskSink,
    limit: int | None = None,
    drop_at: int | None = None,
    on_drop: Callable[[], None] | None = None,
    bytes_per_s: float | None = None,
) -> None:
    """Copy a request body into `sink`; BodyTooLarge past `limit`, Dropped at `drop_at`.

    `bytes_per_s` paces the read: the socket buffer fills and TCP slows the sender down.
    """
    loop = asyncio.get_running_loop()
    next_free = loop.time()
    while True:
        if bytes_per_s:
            delay = next_free - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
        chunk = await content.readany()
        if not chunk:
            return
        if bytes_per_s:
            next_free = max(next_free, loop.time()) + len(chunk) / bytes_per_s
        if drop_at is not None and sink.size + len(chunk) >= drop_at:
            if on_drop is not None:
                on_drop()
            raise Dropped("sandbox fault: connection dropped mid-body")
        if limit is not None and sink.size + len(chunk) > limit:
            raise BodyTooLarge
        await sink.write(chunk)


def decode_md5(value: str) -> bytes | None:
    """A Content-MD5 header's 16 bytes, or None if it is not base64 of 16 bytes."""
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == 16 else None


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()
