"""Streamed request bodies: bytes go to the socket as it takes them, counted for progress."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from workers.sources import SourceInterrupted

SEND_CHUNK = 1024 * 1024  # bytes per socket write (urllib3's default is 16 KiB: too many syscalls)


class StreamBody:
    """A streamed request body of known length that reports bytes as the socket takes them."""

    def __init__(
        self, read: Callable[[int], bytes | memoryview], length: int, on_bytes: Callable[[int], None]
    ) -> None:
        self._read = read
        self._left = length
        self._on_bytes = on_bytes
        self.sent = 0

    def __len__(self) -> int:  # requests and MultipartEncoder want the remaining length
        return self._left

    def read(self, n: int = -1) -> bytes | memoryview:
        if self._left <= 0:
            return b""
        n = self._left if n is None or n < 0 else min(n, self._left)
        data = self._read(n)
        if not data:
            raise SourceInterrupted(f"source ended {self._left} bytes early", code="source-interrupted")
        self._left -= len(data)
        self.sent += len(data)
        self._on_bytes(len(data))
        return data

    def __iter__(self) -> Iterator[bytes | memoryview]:
        while chunk := self.read(SEND_CHUNK):
            yield chunk


def memory_reader(data: bytes) -> Callable[[int], memoryview]:
    """`read(n)` over bytes in memory, without copying them."""
    view = memoryview(data)
    pos = 0

    def read(n: int) -> memoryview:
        nonlocal pos
        chunk = view[pos : pos + n]
        pos += len(chunk)
        return chunk

    return read


def memory_body(data: bytes, on_bytes: Callable[[int], None]) -> StreamBody:
    """A body over bytes in memory (a block, a source that fits in one block)."""
    return StreamBody(memory_reader(data), len(data), on_bytes)
