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
from typing import TYPE_CHECKING

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool

from producers import staging
from producers.intake.problems import Problem
from producers.job_ids import new_job_id
from producers.staging_mode import StagingMode

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

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
    form = _MultipartForm(staging_dir, cap, mode)
    parser = MultipartParser(boundary, form.callbacks())
    try:
        async for chunk in chunks:
            try:
                parser.write(chunk)
            except Exception:
                raise Problem(
                    400, "malformed-multipart", "body: malformed multipart/form-data", "body"
                ) from None
            await form.take_events()
        parser.finalize()
        if form.sink is not None:
            raise Problem(400, "malformed-multipart", "body: the file part did not end", "file")
        return form.staged, form.fields, form.filename
    except BaseException:
        await form.abort()
        raise


class _MultipartForm:
    """What the parts of one multipart body come to: the `file` part streamed to a sink, the
    other parts gathered as small fields. The parser's callbacks are synchronous, so they only
    note events; `take_events` acts on them (writing to the sink awaits)."""

    def __init__(self, staging_dir: Path, cap: int, mode: StagingMode) -> None:
        self.staging_dir, self.cap, self.mode = staging_dir, cap, mode
        self.fields: dict[str, str] = {}
        self.sink: StagingSink | None = None
        self.staged: staging.StreamedBody | None = None
        self.filename: str | None = None
        self._pending: list[tuple[str, bytes]] = []
        self._header_field, self._header_value = bytearray(), bytearray()
        self._headers: dict[bytes, bytes] = {}
        self._current: str | None = None
        self._value = bytearray()

    def callbacks(self) -> MultipartCallbacks:
        def on_header_field(data: bytes, start: int, end: int) -> None:
            self._header_field.extend(data[start:end])

        def on_header_value(data: bytes, start: int, end: int) -> None:
            self._header_value.extend(data[start:end])

        def on_header_end() -> None:
            header = bytes(self._header_field).lower() + b"\0" + bytes(self._header_value)
            self._pending.append(("header", header))
            self._header_field.clear()
            self._header_value.clear()

        def on_part_data(data: bytes, start: int, end: int) -> None:
            self._pending.append(("data", bytes(data[start:end])))

        return {
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": lambda: self._pending.append(("begin", b"")),
            "on_part_data": on_part_data,
            "on_part_end": lambda: self._pending.append(("end", b"")),
        }

    async def take_events(self) -> None:
        for kind, data in self._pending:
            if kind == "header":
                name, _, val = data.partition(b"\0")
                self._headers[name] = val
            elif kind == "begin":
                self._begin_part()
            elif kind == "data":
                await self._part_data(data)
            elif kind == "end":
                await self._end_part()
        self._pending.clear()

    def _begin_part(self) -> None:
        _, opts = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._current = opts.get(b"name", b"").decode("utf-8", "replace")
        self._headers = {}
        self._value.clear()
        if self._current == "file":
            if self.sink is not None or self.staged is not None:
                raise Problem(400, "malformed-multipart", "file: more than one file part", "file")
            raw_name = opts.get(b"filename")
            self.filename = raw_name.decode("utf-8", "replace") if raw_name else None
            self.sink = StagingSink(self.staging_dir, self.filename or "upload", self.cap, self.mode)
        elif len(self.fields) >= MAX_FIELDS:
            raise Problem(400, "malformed-multipart", "body: too many form fields", "body")

    async def _part_data(self, data: bytes) -> None:
        if self._current == "file" and self.sink is not None:
            await self.sink.write(data)
            return
        self._value.extend(data)
        if len(self._value) > MAX_FIELD_BYTES:
            raise Problem(
                400, "field-too-long", f"{self._current}: longer than {MAX_FIELD_BYTES} bytes", self._current
            )

    async def _end_part(self) -> None:
        current = self._current
        if current == "file" and self.sink is not None:
            self.staged = await self.sink.finish()
            self.sink = None
        elif current:
            try:
                self.fields[current] = self._value.decode("utf-8")
            except UnicodeDecodeError:
                raise Problem(400, "malformed-field", f"{current}: not UTF-8", current) from None
        self._current = None

    async def abort(self) -> None:
        """Remove whatever the body staged: the part being written, or the one finished."""
        if self.sink is not None:
            await asyncio.shield(self.sink.abort())
        if self.staged is not None:
            staging.remove_job_dir(self.staging_dir, self.staged.job_id)
