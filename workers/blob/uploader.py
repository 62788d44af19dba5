"""BlobUploader: checks the upload URL, picks the route (one Put Blob, blocks, or the fallback for
hosts that refuse blocks) and restarts a pass whose source broke or whose blocks the host lost."""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterator

import requests

from workers.blob.blocks import put_blocks
from workers.blob.errors import BlocksLost, BlocksRefused
from workers.blob.fallback import PROCESS_FALLBACKS, FallbackStore
from workers.blob.progress import Progress, ProgressFn
from workers.blob.sessions import plain_session
from workers.blob.single import put_file, put_in_memory, put_streamed
from workers.blob.transfer import TransferPolicy, UploadCall, UploadOutcome
from workers.blob.transport import Transport
from workers.blob.urls import check_not_expired, check_upload_url
from workers.block_journal import BlockJournal, MemoryBlockJournal
from workers.errors import AworkError, PermanentError
from workers.sources import ByteSource, FileSource, SourceInterrupted, SourceReader, iter_blocks, read_exact

log = logging.getLogger(__name__)


class BlobUploader:
    """PUTs sources to pre-signed upload URLs on allow-listed hosts. Thread-safe; reuse it."""

    def __init__(
        self,
        allowed_hosts: Collection[str],
        policy: TransferPolicy | None = None,
        session_factory: Callable[[], requests.Session] | None = None,
        fallback_store: FallbackStore | None = None,
        spool_dir: str | None = None,
    ) -> None:
        self.allowed_hosts = tuple(allowed_hosts)
        self.policy = policy or TransferPolicy()
        self._transport = Transport(self.policy, session_factory or plain_session)
        self.fallbacks: FallbackStore = fallback_store or PROCESS_FALLBACKS
        self.spool_dir = spool_dir

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> BlobUploader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def upload(
        self,
        url: str,
        source: ByteSource,
        *,
        content_type: str,
        journal: BlockJournal | None = None,
        progress: ProgressFn | None = None,
        fence: Callable[[], None] | None = None,
    ) -> UploadOutcome:
        """Put `source` at `url`; return what was put, or raise.

        `fence()` is called before every request that commits the blob (Put Blob, Put Block
        List) and raises if this caller may no longer change it (its step lock has lapsed).

        Raises UploadUrlExpired (get a new URL, then call again: the journal forgets blocks of
        another blob by itself), PermanentError (retrying cannot help; nothing is linked) or
        TransientError (retries in this call exhausted: retry the step later, it resumes).
        `progress(bytes_sent, total)` is called from worker threads, at most ~4 times a second,
        and once at the end; `total` is 0 while a URL source's size is unknown.
        """
        target = check_upload_url(url, self.allowed_hosts)
        check_not_expired(url)
        journal = journal if journal is not None else MemoryBlockJournal()
        call = UploadCall(
            url, target, content_type, journal, Progress(progress, self.policy.progress_interval, fence)
        )
        restarts = 0
        lost_once = False
        while True:
            try:
                outcome = self._upload_once(call, source)
            except SourceInterrupted:
                restarts += 1
                if restarts > self.policy.source_restarts:
                    raise
                log.warning("source %s broke; restarting the upload pass (%d)", source.label, restarts)
                continue
            except BlocksLost as exc:
                if lost_once:
                    raise PermanentError(
                        str(exc), status=exc.status, code=exc.code, trace_id=exc.trace_id
                    ) from exc
                lost_once = True
                log.warning("upload host lost uncommitted blocks (%s); sending them all again", exc.code)
                journal.reset()
                continue
            call.tracker.finish(outcome.size)
            return outcome

    def _upload_once(self, call: UploadCall, source: ByteSource) -> UploadOutcome:
        blocks_ok = not self.fallbacks.refuses_blocks(call.target.hostport)
        if source.rereadable:
            return self._upload_rereadable(call, source, blocks_ok)
        return self._upload_stream(call, source, blocks_ok)

    def _upload_stream(self, call: UploadCall, source: ByteSource, blocks_ok: bool) -> UploadOutcome:
        """A stream (URL source) is read once: what fits in one block goes up from memory with
        its MD5, the rest as blocks; a host without blocks gets it streamed in one Put Blob."""
        reader = source.open()
        try:
            size = reader.size
            block_size = self.policy.block_size_of(size)
            call.tracker.reset(size or 0)
            if not blocks_ok and (size is None or size > block_size):
                return put_streamed(self._transport, call, source, reader, self.spool_dir)
            first = read_exact(reader, block_size)
            if len(first) < block_size:  # the whole source fits in one block: hold it in memory
                if size is not None and len(first) != size:
                    raise SourceInterrupted(
                        f"source {source.label} gave {len(first)} of {size} bytes", code="source-interrupted"
                    )
                return put_in_memory(self._transport, call, first)
            try:
                return put_blocks(self._transport, call, _chain_first(first, reader, block_size), size)
            except BlocksRefused as exc:
                self._remember_refusal(call, exc)
        finally:
            reader.close()
        reader = source.open()
        try:
            return put_streamed(self._transport, call, source, reader, self.spool_dir)
        finally:
            reader.close()

    def _upload_rereadable(self, call: UploadCall, source: ByteSource, blocks_ok: bool) -> UploadOutcome:
        """A file: blocks above the single-put threshold, else (or when refused) one Put Blob."""
        probe = source.open()
        size = probe.size
        probe.close()
        if size is None:  # a re-readable source of unknown size: treat it as a stream
            raise PermanentError(f"source {source.label} has no size", code="source-invalid")
        call.tracker.reset(size)
        if size > self.policy.single_put_threshold and blocks_ok:
            try:
                return self._file_blocks(call, source, size)
            except BlocksRefused as exc:
                self._remember_refusal(call, exc)
        return put_file(self._transport, call, source, size)

    def _file_blocks(self, call: UploadCall, source: ByteSource, size: int) -> UploadOutcome:
        """The block route for a file, with staging's block MD5s when they fit this cut."""
        block_size = self.policy.block_size_of(size)
        expected_md5 = source.known_md5 if isinstance(source, FileSource) else None
        staged = source.block_digests if isinstance(source, FileSource) else None
        if staged is not None and not staged.fits(size, block_size, expected_md5):
            log.info("staging's block MD5s do not fit %s: hashing the blocks here", source.label)
            staged = None
        reader = source.open()
        try:
            return put_blocks(
                self._transport,
                call,
                iter_blocks(reader, block_size),
                size,
                expected_md5=expected_md5,
                staged_block_md5s=staged.blocks if staged is not None else None,
            )
        finally:
            reader.close()

    def _remember_refusal(self, call: UploadCall, exc: AworkError) -> None:
        reason = f"{exc.status} {exc.code or ''}".strip()
        host = call.target.hostport
        log.warning("upload host %s refuses block operations (%s): one Put Blob instead", host, reason)
        self.fallbacks.remember_refusal(host, reason)


def _chain_first(first: bytes, reader: SourceReader, block_size: int) -> Iterator[bytes]:
    yield first
    yield from iter_blocks(reader, block_size)
