"""The one-request route, Put Blob: sources that fit in one request, and hosts that refuse blocks.

A re-readable file is hashed beforehand and sent with Content-MD5. A stream is hashed on the way
and compared with the Content-MD5 the server returns (Azure computes it for Put Blob); a stream of
unknown size is spooled to a temporary file first, as Put Blob needs a Content-Length.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import tempfile
from collections.abc import Callable
from typing import Any

import requests

from workers.blob.body import SEND_CHUNK, StreamBody, memory_body
from workers.blob.transfer import MAX_SINGLE_PUT, UploadCall, UploadOutcome
from workers.blob.transport import Put, Transport
from workers.errors import AworkError, PermanentError, TransientError
from workers.sources import ByteSource, FileSource, SourceReader, md5_b64

log = logging.getLogger(__name__)


def single_put(
    t: Transport,
    call: UploadCall,
    body: Callable[[], Any],
    size: int,
    digest: str | None,
    *,
    on_md5_mismatch: Callable[[AworkError], None] | None = None,
    verify: Callable[[requests.Response], AworkError | None] | None = None,
) -> None:
    """Put Blob with retries; `body()` gives a fresh body per attempt, progress restarts with it.

    `verify` may turn a 201 into an error (a server MD5 that differs from the streamed one);
    `on_md5_mismatch` may turn a corrupted attempt into a final error instead of a retry.
    """
    headers = {"x-ms-blob-type": "BlockBlob", "Content-Type": call.content_type, "Content-Length": str(size)}
    if digest is not None:
        headers["Content-MD5"] = digest
    tracker = call.tracker

    def before() -> None:
        tracker.fence()
        tracker.reset(size)

    def on_failure(err: AworkError, _body: Any) -> None:
        if on_md5_mismatch is not None and isinstance(err, TransientError) and err.code == "Md5Mismatch":
            on_md5_mismatch(err)

    t.put(
        Put(
            op="put-blob",
            label="put-blob",
            url=call.url,
            request_url=call.url,
            headers=headers,
            body=body,
            before=before,
            verify=verify,
            on_failure=on_failure,
        )
    )


def put_in_memory(t: Transport, call: UploadCall, data: bytes) -> UploadOutcome:
    """A stream that fits in one block: it is held in memory, so its MD5 goes with the request."""
    digest = md5_b64(data)
    single_put(t, call, lambda: memory_body(data, call.tracker.add), len(data), digest)
    return UploadOutcome(len(data), digest, "single")


def put_file(t: Transport, call: UploadCall, source: ByteSource, size: int) -> UploadOutcome:
    """A re-readable source in one Put Blob with its MD5; a corrupted attempt checks the file again."""
    digest = source.md5_b64() if isinstance(source, FileSource) else md5_of(source)
    _check_single_size(size)
    readers: list[SourceReader] = []

    def body() -> StreamBody | bytes:
        if size == 0:
            return b""
        reader = source.open()
        readers.append(reader)
        return StreamBody(reader.read, size, call.tracker.add)

    def recheck(err: AworkError) -> None:
        # The server saw other bytes than we hashed: in flight (retry) or in the file itself.
        if isinstance(source, FileSource) and source.current_md5() != digest:
            raise PermanentError(
                f"{source.label} no longer matches the MD5 it was sent with: it changed after staging",
                status=err.status,
                code=err.code,
                trace_id=err.trace_id,
            )

    try:
        single_put(t, call, body, size, digest, on_md5_mismatch=recheck)
    finally:
        for r in readers:
            r.close()
    return UploadOutcome(size, digest, "single", fell_back=size > t.policy.single_put_threshold)


def put_streamed(
    t: Transport, call: UploadCall, source: ByteSource, reader: SourceReader, spool_dir: str | None
) -> UploadOutcome:
    """One Put Blob from a stream: MD5 computed on the way, checked against the server's."""
    size = reader.size
    if size is None:
        return _put_spooled(t, call, reader, spool_dir)
    _check_single_size(size)
    readers = [reader]
    digests: list[Any] = []

    def body() -> StreamBody:
        r = readers[-1]
        if digests:  # a retry: the first reader is consumed, open the source again
            r = source.open()
            readers.append(r)
        h = hashlib.md5()
        digests.append(h)

        def read(n: int) -> bytes:
            data = r.read(n)
            h.update(data)
            return data

        return StreamBody(read, size, call.tracker.add)

    def verify(resp: requests.Response) -> AworkError | None:
        return _compare_md5(resp, _b64(digests[-1]), source.label)

    try:
        single_put(t, call, body, size, None, verify=verify)
        return UploadOutcome(size, _b64(digests[-1]), "single", fell_back=True)
    finally:
        for r in readers[1:]:
            r.close()


def _compare_md5(resp: requests.Response, local: str, label: str) -> AworkError | None:
    """A TransientError when the MD5 the server computed is not the one of the bytes streamed."""
    echoed = resp.headers.get("Content-MD5")
    if echoed is None:
        log.warning("upload host returned no Content-MD5: %s is not verified", label)
    elif echoed != local:
        return TransientError(
            f"put-blob: server MD5 {echoed} != streamed MD5 {local}: corrupted on the way",
            status=resp.status_code,
            code="Md5Mismatch",
            trace_id=resp.headers.get("x-ms-request-id"),
        )
    return None


def _put_spooled(
    t: Transport, call: UploadCall, reader: SourceReader, spool_dir: str | None
) -> UploadOutcome:
    """Unknown size on a host without blocks: Put Blob needs a length, so spool to disk once."""
    with tempfile.NamedTemporaryFile(dir=spool_dir, prefix="awork-spool-") as tmp:
        h = hashlib.md5()
        while chunk := reader.read(SEND_CHUNK):
            h.update(chunk)
            tmp.write(chunk)
        tmp.flush()
        with FileSource(tmp.name, md5_b64=_b64(h)) as spooled:
            call.tracker.reset(spooled.size)
            return put_file(t, call, spooled, spooled.size)


def _check_single_size(size: int) -> None:
    if size > MAX_SINGLE_PUT:
        raise PermanentError(
            f"{size} bytes is above Azure's single Put Blob limit and the host refuses blocks",
            code="too-large-for-single-put",
        )


def _b64(h: Any) -> str:
    return base64.b64encode(h.digest()).decode("ascii")


def md5_of(source: ByteSource) -> str:
    """The MD5 of a re-readable source other than a file, in one streaming pass."""
    reader = source.open()
    try:
        h = hashlib.md5()
        while chunk := reader.read(SEND_CHUNK):
            h.update(chunk)
        return _b64(h)
    finally:
        reader.close()
