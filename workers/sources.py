"""Byte sources for the blob transfer: a staged file, or an http(s) URL streamed straight through.

The transfer engine reads every source sequentially, block by block, so a multi-GiB file never
sits in memory and an http(s) source never touches disk. A `FileSource` can be re-read at will
(its MD5 can be computed beforehand, a retry reads its one descriptor again). The http(s) source
is in `workers.url_source`.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

from producers.block_digests import BlockDigests
from producers.safe_open import FileRefused, OpenedFile, open_regular
from workers.errors import PermanentError, TransientError

log = logging.getLogger(__name__)

MiB = 1024 * 1024
READ_CHUNK = 1 * MiB


def md5_b64(data: bytes | bytearray | memoryview) -> str:
    """MD5 in base64, as Content-MD5 wants it."""
    return base64.b64encode(hashlib.md5(data).digest()).decode("ascii")


def file_md5_b64(path: str | os.PathLike[str], chunk: int = 4 * MiB) -> str:
    """The MD5 (base64) of a file in one streaming pass: constant memory whatever the size."""
    digest = hashlib.md5()
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
    return base64.b64encode(digest.digest()).decode("ascii")


class SourceInterrupted(TransientError):
    """The source stream broke and could not be resumed in place: the upload pass restarts."""


@runtime_checkable
class SourceReader(Protocol):
    """A sequential reader from byte 0. `size` is None when the source did not say."""

    size: int | None

    def read(self, n: int) -> bytes:
        """Up to `n` bytes; fewer only at the end; b"" at the end."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class ByteSource(Protocol):
    """Something the uploader can open (again) from the start."""

    @property
    def label(self) -> str:
        """For logs and errors; never contains credentials."""
        ...

    @property
    def rereadable(self) -> bool:
        """True when reading it twice is cheap (a local file): MD5 beforehand, retries re-open."""
        ...

    def open(self) -> SourceReader: ...


def read_exact(reader: SourceReader, n: int) -> bytes:
    """Exactly `n` bytes unless the source ends first."""
    first = reader.read(n)
    if len(first) == n or not first:
        return first
    parts = [first]
    got = len(first)
    while got < n:
        chunk = reader.read(n - got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


# -- files ---------------------------------------------------------------------------------


class _FileReader:
    """Sequential reads by `pread` on the source's one descriptor, never past the size seen at
    open (a file still growing must not change the upload). Readers share the descriptor, each
    with its own position, so a retry or a parallel block reads the same file."""

    def __init__(self, opened: OpenedFile) -> None:
        self._opened = opened
        self.size: int | None = opened.size
        self._pos = 0

    def read(self, n: int) -> bytes:
        data = self._opened.pread(self._pos, n)
        self._pos += len(data)
        return data

    def close(self) -> None:
        """The descriptor belongs to the FileSource (closed with it)."""


class FileSource:
    """A local (staged) file, opened once: every read is a `pread` on that descriptor, so what
    is sent is what was opened (see producers.safe_open). Workers pass `opened` (confined to
    STAGING_DIR by `open_beneath`); otherwise the path is opened on first use (no symlink as last
    component, regular files only). Pass `md5_b64` when the producer already computed it while
    staging, and `block_digests` when it hashed the blocks too (producers.block_digests).
    Close it (or use it as a context manager) when done."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        md5_b64: str | None = None,
        block_digests: BlockDigests | None = None,
        *,
        opened: OpenedFile | None = None,
    ) -> None:
        self.path = Path(path)
        self._md5 = md5_b64
        self.block_digests = block_digests
        self._opened = opened
        self._lock = threading.Lock()

    @property
    def label(self) -> str:
        return f"file:{self.path.name}"

    @property
    def known_md5(self) -> str | None:
        """The MD5 given at construction or computed so far (None: not known yet)."""
        return self._md5

    @property
    def rereadable(self) -> bool:
        return True

    def _file(self) -> OpenedFile:
        with self._lock:
            if self._opened is None:
                try:
                    self._opened = open_regular(self.path)
                except FileRefused as exc:
                    raise file_refused(self.path.name, exc) from None
            return self._opened

    @property
    def size(self) -> int:
        """The size `fstat` gave when the file was opened."""
        return self._file().size

    def open(self) -> _FileReader:
        return _FileReader(self._file())

    def read_range(self, offset: int, length: int) -> bytes:
        """Any range (pread): lets a caller read blocks concurrently or re-read one for a retry."""
        return self._file().pread(offset, length)

    def current_md5(self) -> str:
        """The MD5 (base64) of the bytes on the descriptor now, in one streaming pass."""
        opened = self._file()
        digest = hashlib.md5()
        offset = 0
        while chunk := opened.pread(offset, 4 * MiB):
            digest.update(chunk)
            offset += len(chunk)
        return base64.b64encode(digest.digest()).decode("ascii")

    def md5_b64(self) -> str:
        """The whole file's MD5, computed once (streaming) and cached."""
        if self._md5 is None:
            self._md5 = self.current_md5()
        return self._md5

    def close(self) -> None:
        with self._lock:
            if self._opened is not None:
                self._opened.close()

    def __enter__(self) -> FileSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def file_refused(name: str, exc: FileRefused) -> PermanentError:
    """The job error for a staged file that cannot be used (`source-missing`/`source-refused`)."""
    if exc.missing:
        return PermanentError(f"source file is gone: {name}", code="source-missing")
    return PermanentError(f"source {name} {exc.reason}", code="source-refused")


def iter_blocks(reader: SourceReader, block_size: int) -> Iterator[bytes]:
    """Sequential blocks of `block_size` bytes (the last one shorter), read lazily."""
    while True:
        block = read_exact(reader, block_size)
        if not block:
            return
        yield block
        if len(block) < block_size:
            return


__all__ = [
    "ByteSource",
    "FileSource",
    "SourceInterrupted",
    "SourceReader",
    "file_md5_b64",
    "file_refused",
    "iter_blocks",
    "md5_b64",
    "read_exact",
]
