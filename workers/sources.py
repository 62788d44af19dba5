"""Byte sources for the blob transfer: a staged file, or an http(s) URL streamed straight through.

The transfer engine reads every source sequentially, block by block, so a multi-GiB file never
sits in memory and an http(s) source never touches disk. A `FileSource` can be re-read at will
(its MD5 can be computed beforehand, a retry reads its one descriptor again); a `UrlSource` is
read once, and if the stream breaks it resumes with a `Range` GET where the server allows it.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import threading
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable
from urllib.parse import urljoin, urlsplit

import requests
import urllib3.exceptions

from producers.block_digests import BlockDigests
from producers.safe_open import FileRefused, OpenedFile, open_regular
from producers.source_url import SourceUrlRefused, check_source_url
from workers.errors import PermanentError, TransientError

log = logging.getLogger(__name__)

MiB = 1024 * 1024
READ_CHUNK = 1 * MiB
# AWORK_MAX_SOURCE_BYTES: the most a URL source may send (awork's own limits are lower still).
DEFAULT_MAX_SOURCE_BYTES = 5 * 1024 * MiB


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


# -- http(s) URLs --------------------------------------------------------------------------

_STREAM_ERRORS: tuple[type[BaseException], ...] = (
    requests.exceptions.ConnectionError,
    requests.exceptions.Timeout,
    requests.exceptions.ChunkedEncodingError,
    urllib3.exceptions.ProtocolError,
    urllib3.exceptions.ReadTimeoutError,
    urllib3.exceptions.IncompleteRead,
    OSError,
)


def redact_url(url: str) -> str:
    """`scheme://host:port` of a URL: safe for logs and error texts. A SAS query is a credential,
    and some hosts sign the path itself, so neither is ever shown."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "<malformed URL>"
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if port:
        host = f"{host}:{port}"
    return f"{parts.scheme}://{host}" if parts.scheme else host


def _raise_for_source_status(resp: requests.Response, label: str) -> None:
    status = resp.status_code
    if status in (200, 206):
        return
    msg = f"source {label} answered {status}"
    if status in (408, 425, 429) or status >= 500:
        raise TransientError(msg, status=status, code="source-unavailable")
    raise PermanentError(msg, status=status, code="source-refused")


def _too_large(label: str, what: str, cap: int) -> PermanentError:
    return PermanentError(
        f"source {label} {what}: above the {cap}-byte cap AWORK_MAX_SOURCE_BYTES", code="source-too-large"
    )


class _UrlReader:
    """Reads a streamed GET; on a break, resumes with `Range` + `If-Range` when the server allows.

    Never more than the source's `max_bytes`: a Content-Length above it is refused before the
    body is read, and a body of unknown length stops at the cap.
    """

    def __init__(self, source: UrlSource) -> None:
        self._src = source
        self.pos = 0
        self._resumes = 0
        self._validator: str | None = None
        self._resp = self._get(None)
        headers = self._resp.headers
        length = headers.get("Content-Length")
        self.size: int | None = int(length) if length and length.isdigit() else None
        if self.size is not None and self.size > source.max_bytes:
            self._resp.close()
            raise _too_large(source.label, f"announces {self.size} bytes", source.max_bytes)
        self._validator = headers.get("ETag") or headers.get("Last-Modified")
        if self._validator and self._validator.startswith("W/"):
            self._validator = None  # weak ETags may not be used with If-Range
        self._ranges = headers.get("Accept-Ranges", "").lower() == "bytes"

    def _get(self, start: int | None) -> requests.Response:
        headers = {"Accept-Encoding": "identity"}
        if start is not None:
            headers["Range"] = f"bytes={start}-"
            if self._validator:
                headers["If-Range"] = self._validator
        src = self._src
        url = src.url
        for _hop in range(src.max_redirects + 1):
            try:
                # Redirects are followed here, each hop checked like the first URL (never by
                # requests, which would check nothing).
                resp = src.session.get(
                    url, headers=headers, stream=True, timeout=src.timeout, allow_redirects=False
                )
            except _STREAM_ERRORS as exc:
                # The exception's text carries the path and query: only its class is kept.
                raise SourceInterrupted(
                    f"source {redact_url(url)}: {type(exc).__name__}", code="source-unreachable"
                ) from None
            if resp.status_code not in _REDIRECTS:
                try:
                    _raise_for_source_status(resp, redact_url(url))
                except Exception:
                    resp.close()
                    raise
                return resp
            location = resp.headers.get("Location", "")
            resp.close()
            url = self._next_hop(url, location)
        raise PermanentError(
            f"source {src.label}: more than {src.max_redirects} redirects", code="source-redirect-refused"
        )

    def _next_hop(self, url: str, location: str) -> str:
        src = self._src
        if src.allowed_hosts is None:
            raise PermanentError(
                f"source {redact_url(url)} answered with a redirect; redirects are not followed here",
                code="source-redirect-refused",
            )
        target = urljoin(url, location.strip()) if location else ""
        try:
            check_source_url(target, src.allowed_hosts)
        except SourceUrlRefused as exc:
            raise PermanentError(
                f"source {redact_url(url)} redirected to a refused URL: {exc}", code="source-redirect-refused"
            ) from None
        return target

    @property
    def resumable(self) -> bool:
        return self._ranges and self._validator is not None and self.size is not None

    def _resume(self, cause: BaseException) -> None:
        self._resp.close()
        label = self._src.label
        if not self.resumable or self._resumes >= self._src.max_resumes:
            raise SourceInterrupted(
                f"source {label} broke at byte {self.pos} and cannot be resumed ({type(cause).__name__})",
                code="source-interrupted",
            ) from None
        self._resumes += 1
        why = type(cause).__name__
        log.info("source %s broke at byte %d, resuming with Range (%s)", label, self.pos, why)
        resp = self._get(self.pos)
        expected = f"bytes {self.pos}-"
        content_range = resp.headers.get("Content-Range", "")
        if (
            resp.status_code != 206
            or not content_range.startswith(expected)
            or (not content_range.endswith(f"/{self.size}"))
        ):
            # 200 means the representation changed (If-Range failed) or ranges were ignored.
            resp.close()
            raise SourceInterrupted(
                f"source {label} did not resume at byte {self.pos} "
                f"(status {resp.status_code}, Content-Range {content_range[:80]!r})",
                code="source-changed",
            ) from None
        self._resp = resp

    def read(self, n: int) -> bytes:
        parts: list[bytes] = []
        got = 0
        cap = self._src.max_bytes
        while got < n:
            want = min(n - got, READ_CHUNK)
            try:
                chunk = self._resp.raw.read(want, decode_content=False)
            except _STREAM_ERRORS as exc:
                self._resume(exc)
                continue
            if not chunk:
                if self.size is not None and self.pos < self.size:
                    self._resume(EOFError(f"stream ended at {self.pos} of {self.size}"))
                    continue
                break
            if self.pos + len(chunk) > cap:
                self._resp.close()
                raise _too_large(self._src.label, f"sent more than {cap} bytes", cap)
            parts.append(chunk)
            got += len(chunk)
            self.pos += len(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def close(self) -> None:
        self._resp.close()


_REDIRECTS = frozenset({301, 302, 303, 307, 308})


class UrlSource:
    """An http(s) URL streamed through, never written to disk.

    The caller owns `session`; it is used only for the GETs of this source. Redirects are
    followed only with `allowed_hosts`, every hop checked against it (producers.source_url);
    without it a redirect is refused. At most `max_bytes` are read (AWORK_MAX_SOURCE_BYTES).
    """

    def __init__(
        self,
        url: str,
        session: requests.Session,
        *,
        timeout: tuple[float, float] = (10.0, 120.0),
        max_resumes: int = 5,
        allowed_hosts: Collection[str] | None = None,
        max_bytes: int = DEFAULT_MAX_SOURCE_BYTES,
        max_redirects: int = 5,
    ) -> None:
        if urlsplit(url).scheme not in ("http", "https"):
            raise PermanentError(f"not an http(s) URL: {redact_url(url)}", code="source-refused")
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self.url = url
        self.session = session
        self.timeout = timeout
        self.max_resumes = max_resumes
        self.allowed_hosts = tuple(allowed_hosts) if allowed_hosts is not None else None
        self.max_bytes = max_bytes
        self.max_redirects = max_redirects

    @property
    def label(self) -> str:
        return redact_url(self.url)

    @property
    def rereadable(self) -> bool:
        return False

    def open(self) -> _UrlReader:
        return _UrlReader(self)


def open_url_source(
    url: str, allowed_hosts: Collection[str], max_bytes: int, session: requests.Session
) -> UrlSource:
    """A job's URL source, checked here too: a record may have been written by anyone."""
    try:
        check_source_url(url, allowed_hosts)
    except SourceUrlRefused as exc:
        raise PermanentError(f"source refused: {exc}", code="source-refused") from None
    return UrlSource(url, session, allowed_hosts=allowed_hosts, max_bytes=max_bytes)


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
    "DEFAULT_MAX_SOURCE_BYTES",
    "ByteSource",
    "FileSource",
    "SourceInterrupted",
    "SourceReader",
    "UrlSource",
    "file_md5_b64",
    "file_refused",
    "iter_blocks",
    "md5_b64",
    "open_url_source",
    "read_exact",
    "redact_url",
]
