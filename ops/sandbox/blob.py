"""The blob host: Azure Put Blob, Put Block, Put Block List, Get Block List (and Get Blob).

Only SAS URLs minted by POST /files/generateuploadurl are accepted, and a request carrying an
Authorization header is refused and counted: workers must never send awork's key here.
Bodies stream to disk with the MD5 computed on the way (storage.DiskSink); a blob's
committed content only changes by switching to fully written files, so a half-received PUT
never shows. Put Block List links the block files in order (content.Content) without copying
a byte, as Azure does.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import secrets
import time
import uuid
import xml.etree.ElementTree as ET
from email.utils import formatdate
from xml.sax.saxutils import escape

from aiohttp import web

from .content import Content
from .core import UPLOAD_CONTAINER, Sandbox
from .errors import BlobError
from .faults import Fault
from .sas import SAS_VERSION
from .state import Block, Upload
from .storage import BodyTooLarge, DiskSink, Dropped, b64, decode_md5, receive

log = logging.getLogger("ops.sandbox")

MAX_BLOCK_ID_BYTES = 64
MAX_COMMITTED_BLOCKS = 50_000
MAX_UNCOMMITTED_BLOCKS = 100_000
BLOCK_LIST_BODY_MAX = 8 << 20

STAT_PUT_BLOB = "PUT blob"
STAT_PUT_BLOCK = "PUT blob block"
STAT_PUT_BLOCK_LIST = "PUT blob blocklist"
STAT_GET_BLOCK_LIST = "GET blob blocklist"
STAT_GET_BLOB = "GET blob"


def _abort(request: web.BaseRequest) -> None:
    if request.transport is not None:
        request.transport.abort()


def _http_now() -> str:
    return formatdate(usegmt=True)


def _content_length(request: web.BaseRequest) -> int:
    """Azure needs Content-Length on every write (no chunked uploads)."""
    if request.content_length is None:
        raise BlobError(411, "MissingContentLengthHeader")
    return request.content_length


def _md5_header(request: web.BaseRequest, name: str) -> bytes | None:
    value = request.headers.get(name)
    if value is None:
        return None
    raw = decode_md5(value.strip())
    if raw is None:
        raise BlobError(400, "InvalidMd5", {"HeaderName": name, "HeaderValue": value})
    return raw


def _check_md5(name: str, expected: bytes | None, actual: bytes) -> None:
    if expected is not None and expected != actual:
        raise BlobError(
            400, "Md5Mismatch",
            {"HeaderName": name, "UserSpecifiedMd5": b64(expected),
             "ServerCalculatedMd5": b64(actual)},
        )


class BlobHost:
    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        counters = self.sandbox.state.counters
        counters.blob_requests += 1
        request_id = str(uuid.uuid4())
        method = request.method
        stat = self._stat(method, request.query.get("comp"))
        counters.requests[stat] += 1
        try:
            response = await self._serve(request, stat)
        except (ConnectionError, asyncio.CancelledError):
            raise  # a drop (ours or the client's): nothing to answer
        except Exception as exc:  # a sandbox bug must still look like Azure's 500
            if not isinstance(exc, BlobError):
                log.exception("unhandled error in %s %s", method, request.path)
                exc = BlobError(500, "InternalError", {"Detail": f"Sandbox bug: {exc!r}"})
            body = b"" if method == "HEAD" else exc.body(request_id)
            response = web.Response(
                status=exc.status, body=body, content_type="application/xml",
                headers={"x-ms-error-code": exc.code, **exc.headers},
            )
        response.headers["x-ms-request-id"] = request_id
        response.headers["x-ms-version"] = SAS_VERSION
        response.headers["Date"] = _http_now()
        status = str(response.status)
        counters.statuses[status] += 1
        counters.statuses_by_route[stat][status] += 1
        return response

    async def _serve(self, request: web.BaseRequest, stat: str) -> web.StreamResponse:
        """Refuse an Authorization header, check the SAS, then run the operation with the
        decided fault around it."""
        sb = self.sandbox
        if "Authorization" in request.headers:
            sb.state.counters.blob_authorization_headers += 1
            raise BlobError(
                403, "AuthenticationFailed",
                {"AuthenticationErrorDetail": "An Authorization header was sent to the "
                 "upload host; upload URLs are pre-signed and must be used without one."},
            )
        permissions = sb.signer.verify(request.path, request.query, time.time())
        if stat == "other":
            raise BlobError(405, "UnsupportedHttpVerb")
        upload = self._upload(request.path)
        fault = sb.faults.decide("blob")
        drop_at = await self._before(request, fault)
        window = sb.settings.window_kib * 1024
        pace = window / fault.delay_s if window and fault.delay_s > 0 else None
        response = await self._operate(request, stat, upload, permissions, drop_at, pace)
        self._after(request, fault)
        return response

    async def _before(self, request: web.BaseRequest, fault: Fault) -> int | None:
        """Latency and the faults that strike before the operation; for a drop of a PUT with
        a body, the byte at which to drop it part-way through."""
        counters = self.sandbox.state.counters
        if fault.delay_s > 0:
            counters.faults_injected["latency"] += 1
            await asyncio.sleep(fault.delay_s)
        if fault.kind in ("500", "503", "429"):
            counters.faults_injected[fault.kind] += 1
            raise {
                "500": BlobError(500, "InternalError"),
                "503": BlobError(503, "ServerBusy"),
                "429": BlobError(429, "TooManyRequests"),
            }[fault.kind]
        if fault.kind == "drop":
            counters.faults_injected["drop"] += 1
            length = request.content_length or 0
            if length == 0 or request.method != "PUT":
                _abort(request)
                raise Dropped("sandbox fault: connection dropped")
            return int(fault.fraction * length)
        return None

    async def _operate(
        self, request: web.BaseRequest, stat: str, upload: Upload, permissions: str,
        drop_at: int | None, pace: float | None,
    ) -> web.StreamResponse:
        """The Azure operation that the method and comp= name."""
        if stat == STAT_PUT_BLOB:
            return await self.put_blob(request, upload, permissions, drop_at, pace)
        if stat == STAT_PUT_BLOCK:
            return await self.put_block(request, upload, permissions, drop_at, pace)
        if stat == STAT_PUT_BLOCK_LIST:
            return await self.put_block_list(request, upload, permissions)
        if stat == STAT_GET_BLOCK_LIST:
            return self.get_block_list(request, upload, permissions)
        return self.get_blob(upload, permissions, head=request.method == "HEAD")

    def _after(self, request: web.BaseRequest, fault: Fault) -> None:
        """Faults that lose the answer after the operation did the work."""
        counters = self.sandbox.state.counters
        if fault.kind == "drop_after":
            counters.faults_injected["drop_after"] += 1
            _abort(request)
            raise Dropped("sandbox fault: response dropped after the work was done")
        if fault.kind == "500_after":
            counters.faults_injected["500_after"] += 1
            raise BlobError(500, "InternalError")

    @staticmethod
    def _stat(method: str, comp: str | None) -> str:
        if method == "PUT":
            return {None: STAT_PUT_BLOB, "block": STAT_PUT_BLOCK,
                    "blocklist": STAT_PUT_BLOCK_LIST}.get(comp, "other")
        if method in ("GET", "HEAD"):
            return {None: STAT_GET_BLOB, "blocklist": STAT_GET_BLOCK_LIST}.get(comp, "other")
        return "other"

    def _upload(self, path: str) -> Upload:
        container, _, blob = path.lstrip("/").partition("/")
        if container != UPLOAD_CONTAINER:
            raise BlobError(404, "ContainerNotFound")
        upload = self.sandbox.state.uploads.get(blob)
        if upload is None:  # signed by us, but forgotten by a reset
            raise BlobError(404, "ContainerNotFound")
        upload.dir.mkdir(exist_ok=True)
        return upload

    # --- operations ------------------------------------------------------------------------

    async def _receive(
        self, request: web.BaseRequest, upload: Upload, prefix: str, length: int,
        drop_at: int | None, pace: float | None,
    ) -> tuple[DiskSink, bytes]:
        sink = DiskSink(upload.next_path(prefix))
        try:
            await receive(request.content, sink, limit=length, drop_at=drop_at,
                          on_drop=lambda: _abort(request), bytes_per_s=pace)
            md5 = await sink.finish()
        except BaseException:
            await sink.abort()
            raise
        if sink.size != length:
            sink.path.unlink()
            raise BlobError(400, "IncompleteBody")
        self.sandbox.state.counters.bytes_received += sink.size
        return sink, md5

    async def put_blob(
        self, request: web.BaseRequest, upload: Upload, permissions: str, drop_at: int | None,
        pace: float | None = None,
    ) -> web.StreamResponse:
        if "w" not in permissions and not ("c" in permissions and not upload.committed):
            raise BlobError(403, "AuthorizationPermissionMismatch")
        blob_type = request.headers.get("x-ms-blob-type")
        if blob_type is None:
            raise BlobError(400, "MissingRequiredHeader", {"HeaderName": "x-ms-blob-type"})
        if blob_type != "BlockBlob":
            raise BlobError(400, "InvalidHeaderValue",
                            {"HeaderName": "x-ms-blob-type", "HeaderValue": blob_type,
                             "Reason": "The sandbox stores block blobs only."})
        length = _content_length(request)
        cap = self.sandbox.settings.put_blob_max_bytes
        if length > cap:
            raise BlobError(413, "RequestBodyTooLarge", {"MaxLimit": str(cap)})
        content_md5 = _md5_header(request, "Content-MD5")
        blob_md5 = _md5_header(request, "x-ms-blob-content-md5")
        try:
            sink, md5 = await self._receive(request, upload, "put", length, drop_at, pace)
        except BodyTooLarge:  # more bytes than Content-Length: aiohttp prevents it
            raise BlobError(400, "InvalidHeaderValue", {"HeaderName": "Content-Length"}) from None
        try:
            _check_md5("Content-MD5", content_md5, md5)
            _check_md5("x-ms-blob-content-md5", blob_md5, md5)
        except BlobError:
            sink.path.unlink()
            raise
        async with upload.lock:
            upload.commit(Content((sink.path,), sink.size, md5), blocks=[])
            upload.block_id_len = None
            upload.content_md5 = b64(md5)
            upload.content_type = (
                request.headers.get("x-ms-blob-content-type")
                or request.headers.get("Content-Type")
                or "application/octet-stream"
            )
            upload.blob_puts += 1
            self._touch(upload)
        return web.Response(status=201, headers={
            "ETag": upload.etag, "Last-Modified": upload.last_modified,
            "Content-MD5": b64(md5), "x-ms-request-server-encrypted": "true",
        })

    async def put_block(
        self, request: web.BaseRequest, upload: Upload, permissions: str, drop_at: int | None,
        pace: float | None = None,
    ) -> web.StreamResponse:
        if "w" not in permissions and "c" not in permissions:
            raise BlobError(403, "AuthorizationPermissionMismatch")
        block_id = request.query.get("blockid")
        if block_id is None:
            raise BlobError(400, "MissingRequiredQueryParameter",
                            {"QueryParameterName": "blockid"})
        raw_len = _block_id_length(block_id)
        expected_len = upload.block_id_len
        if expected_len is not None and raw_len != expected_len:
            raise BlobError(400, "InvalidBlobOrBlock",
                            {"Reason": f"All block ids of a blob must have the same length "
                             f"({expected_len} bytes before encoding)."})
        if block_id not in upload.uncommitted and len(upload.uncommitted) >= MAX_UNCOMMITTED_BLOCKS:
            raise BlobError(409, "BlockCountExceedsLimit")
        length = _content_length(request)
        cap = self.sandbox.settings.put_block_max_bytes
        if length > cap:
            raise BlobError(413, "RequestBodyTooLarge", {"MaxLimit": str(cap)})
        content_md5 = _md5_header(request, "Content-MD5")
        sink, md5 = await self._receive(request, upload, "block", length, drop_at, pace)
        try:
            _check_md5("Content-MD5", content_md5, md5)
        except BlobError:
            sink.path.unlink()
            raise
        # Checked again: another block may have set the length while this one streamed.
        if upload.block_id_len is not None and raw_len != upload.block_id_len:
            sink.path.unlink()
            raise BlobError(400, "InvalidBlobOrBlock")
        old = upload.uncommitted.get(block_id)
        upload.uncommitted[block_id] = Block(block_id, sink.size, md5, sink.path)
        if old is not None:
            old.path.unlink(missing_ok=True)
        upload.block_id_len = raw_len
        self.sandbox.state.counters.blocks[upload.upload_id][block_id] += 1
        return web.Response(status=201, headers={
            "Content-MD5": b64(md5), "x-ms-request-server-encrypted": "true",
        })

    async def put_block_list(
        self, request: web.BaseRequest, upload: Upload, permissions: str
    ) -> web.StreamResponse:
        if "w" not in permissions and not ("c" in permissions and not upload.committed):
            raise BlobError(403, "AuthorizationPermissionMismatch")
        length = _content_length(request)
        if length > BLOCK_LIST_BODY_MAX:
            raise BlobError(413, "RequestBodyTooLarge", {"MaxLimit": str(BLOCK_LIST_BODY_MAX)})
        content_md5 = _md5_header(request, "Content-MD5")
        blob_md5 = _md5_header(request, "x-ms-blob-content-md5")  # stored, not validated
        body = await request.content.read(length + 1)
        if len(body) != length:
            raise BlobError(400, "IncompleteBody")
        _check_md5("Content-MD5", content_md5, hashlib.md5(body).digest())
        entries = _parse_block_list(body)
        if len(entries) > MAX_COMMITTED_BLOCKS:
            raise BlobError(400, "InvalidBlockList",
                            {"Reason": f"more than {MAX_COMMITTED_BLOCKS} blocks"})
        async with upload.lock:
            committed = {b.block_id: b for b in upload.committed_blocks}
            chosen: list[Block] = []
            for kind, block_id in entries:
                block = None
                if kind in ("Uncommitted", "Latest"):
                    block = upload.uncommitted.get(block_id)
                if block is None and kind in ("Committed", "Latest"):
                    block = committed.get(block_id)
                if block is None:
                    raise BlobError(400, "InvalidBlockList",
                                    {"Reason": f"{kind} block {block_id!r} does not exist"})
                chosen.append(block)
            size = sum(b.size for b in chosen)
            upload.commit(Content(tuple(b.path for b in chosen), size), blocks=chosen)
            upload.block_id_len = upload.block_id_len if chosen else None
            upload.content_md5 = b64(blob_md5) if blob_md5 is not None else None
            upload.content_type = (
                request.headers.get("x-ms-blob-content-type") or "application/octet-stream"
            )
            upload.blob_puts += 1
            self._touch(upload)
        return web.Response(status=201, headers={
            "ETag": upload.etag, "Last-Modified": upload.last_modified,
            "Content-MD5": b64(hashlib.md5(body).digest()),
            "x-ms-request-server-encrypted": "true",
        })

    def get_block_list(
        self, request: web.BaseRequest, upload: Upload, permissions: str
    ) -> web.StreamResponse:
        if "r" not in permissions:
            raise BlobError(403, "AuthorizationPermissionMismatch")
        list_type = request.query.get("blocklisttype", "committed").lower()
        if list_type not in ("committed", "uncommitted", "all"):
            raise BlobError(400, "InvalidQueryParameterValue",
                            {"QueryParameterName": "blocklisttype",
                             "QueryParameterValue": list_type})
        if not upload.committed and not upload.uncommitted:
            raise BlobError(404, "BlobNotFound")

        def section(tag: str, blocks: list[Block]) -> str:
            inner = "".join(
                f"<Block><Name>{escape(b.block_id)}</Name><Size>{b.size}</Size></Block>"
                for b in blocks
            )
            return f"<{tag}>{inner}</{tag}>"

        parts = []
        if list_type in ("committed", "all"):
            parts.append(section("CommittedBlocks", upload.committed_blocks))
        if list_type in ("uncommitted", "all"):
            parts.append(section("UncommittedBlocks", list(upload.uncommitted.values())))
        body = ('<?xml version="1.0" encoding="utf-8"?><BlockList>'
                + "".join(parts) + "</BlockList>")
        headers = {"x-ms-blob-content-length": str(upload.size if upload.committed else 0)}
        if upload.committed:
            headers.update({"ETag": upload.etag, "Last-Modified": upload.last_modified})
        return web.Response(status=200, body=body.encode(), content_type="application/xml",
                            headers=headers)

    def get_blob(self, upload: Upload, permissions: str, head: bool) -> web.StreamResponse:
        if "r" not in permissions:
            raise BlobError(403, "AuthorizationPermissionMismatch")
        if upload.content is None:
            raise BlobError(404, "BlobNotFound")
        headers = {
            "ETag": upload.etag, "Last-Modified": upload.last_modified,
            "Content-Type": upload.content_type or "application/octet-stream",
            "x-ms-blob-type": "BlockBlob",
        }
        if upload.content_md5:
            headers["Content-MD5"] = upload.content_md5
        if head:
            headers["Content-Length"] = str(upload.size)
            return web.Response(status=200, headers=headers)
        return upload.content.response(headers)

    # --- helpers ---------------------------------------------------------------------------

    @staticmethod
    def _touch(upload: Upload) -> None:
        upload.etag = f'"0x{secrets.token_hex(8).upper()}"'
        upload.last_modified = _http_now()


def _block_id_length(block_id: str) -> int:
    try:
        raw = base64.b64decode(block_id, validate=True)
    except (binascii.Error, ValueError):
        raise BlobError(400, "InvalidQueryParameterValue",
                        {"QueryParameterName": "blockid", "QueryParameterValue": block_id,
                         "Reason": "Not a valid base64 string."}) from None
    if not raw or len(raw) > MAX_BLOCK_ID_BYTES:
        raise BlobError(400, "InvalidQueryParameterValue",
                        {"QueryParameterName": "blockid", "QueryParameterValue": block_id,
                         "Reason": f"A block id is 1 to {MAX_BLOCK_ID_BYTES} bytes before "
                         "base64 encoding."})
    return len(raw)


def _parse_block_list(body: bytes) -> list[tuple[str, str]]:
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        raise BlobError(400, "InvalidXmlDocument") from None
    if root.tag != "BlockList":
        raise BlobError(400, "InvalidXmlDocument", {"Reason": "The root element must be BlockList."})
    entries: list[tuple[str, str]] = []
    for el in root:
        if el.tag not in ("Latest", "Committed", "Uncommitted"):
            raise BlobError(400, "InvalidXmlDocument",
                            {"Reason": f"Unexpected element {el.tag!r} in BlockList."})
        entries.append((el.tag, (el.text or "").strip()))
    return entries
