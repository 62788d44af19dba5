"""Files for the demo and tests: random bytes of a given size, and small valid PNG images."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path


def random_file(path: Path, size: int, chunk: int = 8 * 1024 * 1024) -> Path:
    """`size` random bytes, written in chunks so memory stays flat."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh:
        left = size
        while left > 0:
            n = min(chunk, left)
            fh.write(os.urandom(n))
            left -= n
    return path


def png_bytes(width: int = 16, height: int = 16, rgb: tuple[int, int, int] = (40, 120, 200)) -> bytes:
    """A valid RGB PNG of one colour."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)

    row = b"\x00" + bytes(rgb) * width
    raw = row * height
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def png_file(path: Path, width: int = 16, height: int = 16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(width, height))
    return path
