"""A blob's committed bytes: one file (Put Blob, multipart) or block files in list order.

Azure commits a block list without touching the bytes, so the sandbox does the same: Put Block
List records which block files make up the blob, in order, instead of copying them into one
file. The copy made a 1 GiB commit cost seconds of disk and CPU that no real host charges, and
so hid what blocks in flight are worth. Azure never computes the MD5 of a committed block list
(x-ms-blob-content-md5 is stored as sent); the sandbox computes it the first time a test asks
(stats, admin API), so tests can still check what arrived byte for byte.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Mapping
from pathlib import Path

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

READ_BYTES = 1 << 20


class Content:
    """Immutable: a recommit makes a new Content, so a linked file keeps its bytes."""

    __slots__ = ("_md5", "parts", "size")

    def __init__(self, parts: tuple[Path, ...], size: int, md5: bytes | None = None) -> None:
        self.parts = parts
        self.size = size
        self._md5 = md5

    @property
    def md5(self) -> bytes:
        """The MD5 of the bytes; read from disk once when not known (blocking)."""
        if self._md5 is None:
            h = hashlib.md5()
            for p in self.parts:
                with open(p, "rb") as f:
                    while buf := f.read(READ_BYTES):
                        h.update(buf)
            self._md5 = h.digest()
        return self._md5

    def head(self, n: int) -> bytes:
        """The first `n` bytes (magic-byte checks), across parts if they are small."""
        out = b""
        for p in self.parts:
            with open(p, "rb") as f:
                out += f.read(n - len(out))
            if len(out) >= n:
                break
        return out

    def response(self, headers: Mapping[str, str]) -> web.StreamResponse:
        if len(self.parts) == 1:
            return web.FileResponse(self.parts[0], headers=headers)
        return _PartsResponse(self, headers)


class _PartsResponse(web.StreamResponse):
    """Streams the parts one after another (no Range support: nothing here asks for it)."""

    def __init__(self, content: Content, headers: Mapping[str, str]) -> None:
        super().__init__(status=200, headers=headers)
        self.content_length = content.size
        self._content = content

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        writer = await super().prepare(request)
        if request.method != "HEAD":
            loop = asyncio.get_running_loop()
            for p in self._content.parts:
                with open(p, "rb") as f:
                    while buf := await loop.run_in_executor(None, f.read, READ_BYTES):
                        await self.write(buf)
        return writer
