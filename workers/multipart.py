"""The one-request route (companies, users, workspaces, projecttemplates): a streamed
multipart/form-data body for `POST /{entity}/{id}/files`.

awork gets no Content-MD5 on this route, so the staged MD5 is checked here, while streaming:
the bytes are hashed as the encoder reads them from the source's one descriptor, and the read
that would hand over the file's last bytes first compares the digest with the MD5 recorded at
staging. On a mismatch that read raises `source-changed`, the request is aborted mid-body and
the connection closed, so awork never receives a complete body (its last file bytes and the
closing boundary are never sent) and creates no file. Hashing in a separate pass before sending
would cost a second read of up to 1 GB and still leave a window in which the file could change
between the pass and the send; checking on the bytes actually sent has no such window.
A file referenced in place has no staged MD5: there the size seen at open is the only check.
"""

from __future__ import annotations

import hashlib
from base64 import b64encode
from collections.abc import Callable
from typing import Any

from requests_toolbelt.multipart.encoder import MultipartEncoder, MultipartEncoderMonitor

from producers.contract import MULTIPART_MAX_BYTES
from workers.blob.body import StreamBody
from workers.blob.progress import Progress, ProgressFn
from workers.errors import PermanentError
from workers.sources import ByteSource, FileSource, SourceReader


def _multipart_size(source: ByteSource, size: int | None) -> int:
    if size is None:
        raise PermanentError(
            f"source {source.label} has no Content-Length: cannot stream it as multipart",
            code="source-invalid",
        )
    if size > MULTIPART_MAX_BYTES:
        raise PermanentError(
            f"{size} bytes is above awork's {MULTIPART_MAX_BYTES}-byte limit for this route",
            code="request-body-too-large",
        )
    return size


def verified_reads(reader: SourceReader, size: int, expected_md5: str, label: str) -> Callable[[int], bytes]:
    """`reader.read`, hashing on the way; the read that reaches byte `size` returns only when
    the digest equals `expected_md5`, else raises PermanentError `source-changed`."""
    digest = hashlib.md5(usedforsecurity=False)
    got = 0

    def read(n: int) -> bytes:
        nonlocal got
        data = reader.read(n)
        digest.update(data)
        got += len(data)
        if got >= size:
            actual = b64encode(digest.digest()).decode("ascii")
            if actual != expected_md5:
                raise PermanentError(
                    f"{label} no longer matches the MD5 recorded at staging ({actual} != {expected_md5}): "
                    "it changed after staging; the request was aborted before its end",
                    code="source-changed",
                )
        return data

    return read


def multipart_body(
    source: ByteSource,
    file_name: str,
    content_type: str,
    progress: ProgressFn | None = None,
) -> tuple[MultipartEncoder | MultipartEncoderMonitor, str, int]:
    """A streamed multipart/form-data body with the file in part `File`, for POST .../files.

    Returns (body, Content-Type header, Content-Length). The body reads the source as requests
    sends it (`data=body`), so a 1 GB file never sits in memory. Built once per request: a retry
    calls this again. A URL source must announce its size (awork needs a Content-Length). A file
    with a staged MD5 (`FileSource.known_md5`) is checked against it while streaming.
    """
    stream: Any
    reader = source.open()
    try:
        size = _multipart_size(source, reader.size)
    except BaseException:
        reader.close()
        raise
    read: Callable[[int], bytes] = reader.read
    if isinstance(source, FileSource) and source.known_md5 is not None:
        read = verified_reads(reader, size, source.known_md5, source.label)
    stream = StreamBody(read, size, lambda n: None) if size else b""
    if not size:
        reader.close()
    encoder = MultipartEncoder(fields={"File": (file_name, stream, content_type)})
    body: MultipartEncoder | MultipartEncoderMonitor = encoder
    if progress is not None:
        tracker = Progress(progress, 0.25)
        tracker.reset(encoder.len)
        last = [0]

        def on_read(monitor: MultipartEncoderMonitor) -> None:
            tracker.add(monitor.bytes_read - last[0])
            last[0] = monitor.bytes_read

        body = MultipartEncoderMonitor(encoder, on_read)
    return body, encoder.content_type, encoder.len


__all__ = ["multipart_body", "verified_reads"]
