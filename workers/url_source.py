"""An http(s) URL source streamed straight through: redirects checked hop by hop, a size cap,
and error texts that name the host only.

A `UrlSource` is read once, and if the stream breaks it resumes with a `Range` GET where the
server allows it.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from urllib.parse import urljoin, urlsplit

import requests
import urllib3.exceptions

from producers.config import DEFAULT_MAX_SOURCE_BYTES
from producers.source_url import SourceUrlRefused, check_source_url
from workers.errors import PermanentError, TransientError
from workers.sources import READ_CHUNK, SourceInterrupted

log = logging.getLogger(__name__)


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


__all__ = ["DEFAULT_MAX_SOURCE_BYTES", "UrlSource", "open_url_source", "redact_url"]
