"""Request bodies streamed into STAGING_DIR, hashed on the way, never held in memory.

`StagingSink` takes the body's chunks as the ASGI server hands them over, gathers them into
1 MiB buffers and passes each to one writer thread that updates the MD5 and writes it to the
job's staged file (both release the GIL, so receiving and hashing/writing overlap on two cores).
At most QUEUE_BUFFERS buffers wait at a time: a client faster than the disk is slowed down by
TCP, and memory stays flat whatever the body's size. Over the cap (AWORK_MAX_SOURCE_BYTES) the
request ends with 413; on any error the partial file and its folder are removed and no record
is written. `multipart_to_staging` parses multipart/form-data the same way (python-multipart's
streaming parser): the `file` part goes to a sink, the other parts are small fields.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from queue import Queue

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool

from producers import staging
from producers.intake.problems import Problem
from producers.job_ids import new_job_id
from producers.staging_mode import StagingMode

BUFFER_BYTES = 1024 * 1024
QUEUE_BUFFERS = 4
HEAD_BYTES = 16
MAX_FIELD_BYTES = 8192
MAX_FIELDS = 32


class StagingSink:
    def __init__(self, staging_dir: Path, file_name: str, cap: int, mode: StagingMode) -> None:
        self.staging_dir, self.cap = staging_dir, cap
        self.job_id = new_job_id()
        self.path, self._fd = staging.create_job_file(staging_dir, self.job_id, file_name or "upload", mode)
        self._md5 = hashlib.md5(usedforsecurity=False)
        self.size = 0
        self.head = b""
        self._buf: list[bytes] = []
        self._buffered = 0
        self._queue: Queue[list[bytes] | None] = Queue(QUEUE_BUFFERS)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name="intake-body-writer", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while True:
            block = self._queue.get()
            if block is None:
                return
            if self._error is not None:
                continue
            try:
                for chunk in block:
                    self._md5.update(chunk)
                staging.write_all(self._fd, block)
            except BaseException as exc:  # reported by finish()
                self._error = exc

    async def write(self, chunk: bytes) -> None:
        if not chunk:
            return
        self.size += len(chunk)
        if self.size > self.cap:
            raise Problem(
                413, "body-too-large", f"body: over the {self.cap} byte cap (AWORK_MAX_SOURCE_BYTES)", "body"
            )
        if len(self.head) < HEAD_BYTES:
            self.head += chunk[: HEAD_BYTES - len(self.head)]
        self._buf.append(chunk)  # no copy: the chunks go to the writer as they are
        self._buffered += len(chunk)
        if self._buffered >= BUFFER_BYTES:
            await self._hand_over(self._buf)
            self._buf, self._buffered = [], 0

    async def _hand_over(self, block: list[bytes]) -> None:
        if self._queue.full():  # the disk is behind: wait in a thread, not in the event loop
            await run_in_threadpool(self._queue.put, block)
        else:
            self._queue.put_nowait(block)

    async def finish(self) -> staging.StreamedBody:
        if self._buf:
            await self._hand_over(self._buf)
            self._buf, self._buffered = [], 0
        await self._close()
        if self._error is not None:
            self.discard()
            raise self._error
        if self.size == 0:
            self.discard()
            raise Problem(422, "empty-file", "body: no bytes (awork does not take empty files)", "body")
        md5 = base64.b64encode(self._md5.digest()).decode()
        return staging.StreamedBody(self.job_id, self.path, md5, self.size, self.head)

    async def _close(self) -> None:
        if self._thread.is_alive():
            await run_in_threadpool(self._queue.put, None)
            await run_in_threadpool(self._thread.join)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    async def abort(self) -> None:
        self._error = self._error or RuntimeError("aborted")
        await self._close()
        self.discard()

    def discard(self) -> None:
        staging.remove_job_dir(self.staging_dir, self.job_id)


async def body_to_staging(
    chunks: AsyncIterator[bytes], staging_dir: Path, file_name: str, cap: int, mode: StagingMode
) -> staging.StreamedBody:
    sink = StagingSink(staging_dir, file_name, cap, mode)
    try:
        async for chunk in chunks:
            await sink.write(chunk)
        return await sink.finish()
    except BaseException:
        await asyncio.shield(sink.abort())
        raise


async def multipart_to_staging(
    chunks: AsyncIterator[bytes],
    content_type: str,
    staging_dir: Path,
    cap: int,
    mode: StagingMode,
) -> tuple[staging.StreamedBody | None, dict[str, str], str | None]:
    """(the `file` part staged, the other fields, the file part's filename)."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise Problem(
            400, "malformed-multipart", "content-type: multipart/form-data without a boundary", "content-type"
        )
    fields: dict[str, str] = {}
    pending: list[tuple[str, bytes]] = []  # events gathered by the (sync) parser callbacks
    header_field, header_value = bytearray(), bytearray()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header_field.extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header_value.extend(data[start:end])

    def on_header_end() -> None:
        pending.append(("header", bytes(header_field).lower() + b"\0" + bytes(header_value)))
        header_field.clear()
        header_value.clear()

    def on_headers_finished() -> None:
        pending.append(("begin", b""))

    def on_part_data(data: bytes, start: int, end: int) -> None:
        pending.append(("data", bytes(data[start:end])))

    def on_part_end() -> None:
        pending.append(("end", b""))

    parser = MultipartParser(
        boundary,
        {
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
        },
    )
    sink: StagingSink | None = None
    staged: staging.StreamedBody | None = None
    filename: str | None = None
    headers: dict[bytes, bytes] = {}
    current: str | None = None
    value = bytearray()
    try:
        async for chunk in chunks:
            try:
                parser.write(chunk)
            except Exception:
                raise Problem(
                    400, "malformed-multipart", "body: malformed multipart/form-data", "body"
                ) from None
            for kind, data in pending:
                if kind == "header":
                    name, _, val = data.partition(b"\0")
                    headers[name] = val
                elif kind == "begin":
                    _, opts = parse_options_header(headers.get(b"content-disposition", b""))
                    current = opts.get(b"name", b"").decode("utf-8", "replace")
                    headers = {}
                    value.clear()
                    if current == "file":
                        if sink is not None or staged is not None:
                            raise Problem(400, "malformed-multipart", "file: more than one file part", "file")
                        raw_name = opts.get(b"filename")
                        filename = raw_name.decode("utf-8", "replace") if raw_name else None
                        sink = StagingSink(staging_dir, filename or "upload", cap, mode)
                    elif len(fields) >= MAX_FIELDS:
                        raise Problem(400, "malformed-multipart", "body: too many form fields", "body")
                elif kind == "data":
                    if current == "file" and sink is not None:
                        await sink.write(data)
                    else:
                        value.extend(data)
                        if len(value) > MAX_FIELD_BYTES:
                            raise Problem(
                                400,
                                "field-too-long",
                                f"{current}: longer than {MAX_FIELD_BYTES} bytes",
                                current,
                            )
                elif kind == "end":
                    if current == "file" and sink is not None:
                        staged = await sink.finish()
                        sink = None
                    elif current:
                        try:
                            fields[current] = value.decode("utf-8")
                        except UnicodeDecodeError:
                            raise Problem(400, "malformed-field", f"{current}: not UTF-8", current) from None
                    current = None
            pending.clear()
        parser.finalize()
        if sink is not None:
            raise Problem(400, "malformed-multipart", "body: the file part did not end", "file")
        return staged, fields, filename
    except BaseException:
        if sink is not None:
            await asyncio.shield(sink.abort())
        if staged is not None:
            staging.remove_job_dir(staging_dir, staged.job_id)
        raise
