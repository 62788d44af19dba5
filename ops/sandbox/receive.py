"""Multipart bodies received to disk: the `File` part streamed under the size cap (with the
injected drops), its form fields, and the move of a received part into stored content. Both the
file routes (ops.sandbox.app) and new versions (ops.sandbox.recurring) receive this way."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import BodyPartReader, web

from . import errors as E
from .content import Content
from .errors import ApiError
from .routing import Ctx, abort_connection, media_type
from .storage import BodyTooLarge, DiskSink, Dropped

MULTIPART_SLACK = 1 << 20  # framing allowance over the file cap before we refuse unread


@dataclass
class Received:
    """A multipart body's file part, on disk, plus its plain form fields."""

    sink: DiskSink
    file_name: str
    part_type: str | None
    form: dict[str, str]
    md5: bytes


async def receive_multipart(ctx: Ctx) -> Received:
    """Stream a multipart/form-data body's `File` part to disk (size cap, injected drops)."""
    sb = ctx.sandbox
    request = ctx.request
    cap = sb.settings.multipart_max_bytes
    too_large = ApiError(
        400, E.REQUEST_BODY_TOO_LARGE,
        f"The request body is too large: files may have at most {cap} bytes.",
    )
    if request.content_length is not None and request.content_length > cap + MULTIPART_SLACK:
        raise too_large
    if media_type(request) != "multipart/form-data":
        raise ApiError(415, E.UNSUPPORTED_MEDIA_TYPE, "The request body must be multipart/form-data.")
    drop_at = None
    if ctx.fault.kind == "drop":
        drop_at = int(ctx.fault.fraction * (request.content_length or 0))
    sink: DiskSink | None = None
    file_name = ""
    part_type: str | None = None
    form: dict[str, str] = {}
    try:
        try:
            reader = await request.multipart()
            while True:
                part = await reader.next()
                if part is None:
                    break
                if not isinstance(part, BodyPartReader):
                    raise ValueError("nested multipart is not supported")
                name = (part.name or "").lower()
                if name == "file" and part.filename is not None and sink is None:
                    file_name = part.filename
                    part_type = part.headers.get("Content-Type")
                    sink = DiskSink(sb.state.tmp_path())
                    await _receive_part(part, sink, cap, drop_at, request)
                elif name in ("name", "description") and part.filename is None:
                    form[name] = (await part.read(decode=True)).decode("utf-8", "replace")
                else:
                    await part.release()
        except (ValueError, AssertionError) as exc:
            raise E.validation_failed([("File", f"Malformed multipart body: {exc}")]) from None
        except BodyTooLarge:
            raise too_large from None
        if drop_at is not None:  # the drop point fell in the framing, not in the file
            abort_connection(request)
            raise Dropped("sandbox fault: connection dropped")
        if sink is None:
            raise E.validation_failed([("File", "The File field is required.")])
        md5 = await sink.finish()
    except BaseException:
        if sink is not None:
            await sink.abort()
        raise
    return Received(sink, file_name, part_type, form, md5)


def keep_received(ctx: Ctx, got: Received, file_id: str) -> Content:
    """Move a received part into the files directory; its bytes become stored content."""
    path = ctx.sandbox.state.new_file_path(file_id)
    got.sink.path.replace(path)
    ctx.sandbox.state.counters.bytes_received += got.sink.size
    return Content((path,), got.sink.size, got.md5)


async def _receive_part(
    part: BodyPartReader, sink: DiskSink, cap: int, drop_at: int | None,
    request: web.BaseRequest,
) -> None:
    """Stream one multipart part (aiohttp decodes it chunk by chunk) into `sink`."""
    while True:
        chunk = await part.read_chunk(1 << 20)
        if not chunk:
            return
        if drop_at is not None and sink.size + len(chunk) >= drop_at:
            abort_connection(request)
            raise Dropped("sandbox fault: connection dropped mid-body")
        if sink.size + len(chunk) > cap:
            raise BodyTooLarge
        await sink.write(chunk)

