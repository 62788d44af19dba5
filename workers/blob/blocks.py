"""The block route: Put Block for every block (`parallel_blocks` in flight, each with its MD5 and
retries, acknowledged in the journal), then Put Block List with the whole file's MD5."""

from __future__ import annotations

import base64
import hashlib
import logging
import threading
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from producers.block_digests import MAX_BLOCKS
from workers.blob.body import StreamBody, memory_body
from workers.blob.errors import Aborted
from workers.blob.transfer import UploadCall, UploadOutcome
from workers.blob.transport import Put, Transport
from workers.blob.urls import upload_identity, with_query
from workers.errors import AworkError, PermanentError
from workers.sources import SourceInterrupted, md5_b64

log = logging.getLogger(__name__)


def block_id(index: int) -> str:
    """Azure wants base64 ids of one length per blob: a fixed-width counter gives that."""
    return base64.b64encode(f"{index:08d}".encode()).decode("ascii")


@dataclass
class Stats:
    lock: threading.Lock = field(default_factory=threading.Lock)
    sent: int = 0
    skipped: int = 0
    retries: int = 0

    def bump(self, what: str) -> None:
        with self.lock:
            setattr(self, what, getattr(self, what) + 1)


@dataclass(frozen=True)
class BlockPass:
    """One pass of Put Block over a source: what the requests of all its blocks share."""

    t: Transport
    call: UploadCall
    acked: dict[str, str]  # block id -> MD5 acknowledged by an earlier attempt (the journal)
    abort: threading.Event = field(default_factory=threading.Event)
    stats: Stats = field(default_factory=Stats)


@dataclass(frozen=True)
class Block:
    bid: str
    data: bytes
    staged_md5: str | None  # taken while staging: nothing to hash here


def put_blocks(
    t: Transport,
    call: UploadCall,
    blocks: Iterator[bytes],
    size: int | None,
    *,
    expected_md5: str | None = None,
    staged_block_md5s: tuple[str, ...] | None = None,
) -> UploadOutcome:
    """Put Block for every block, then Put Block List.

    With `staged_block_md5s` (taken while staging, see producers.block_digests) nothing is
    hashed here: the host checks each block against what the producer read, which also
    proves the file is still what was staged, and `expected_md5` is the whole file's.
    """
    if staged_block_md5s is not None and expected_md5 is None:
        raise ValueError("staged block MD5s come with the whole file's MD5")
    call.journal.begin(f"{upload_identity(call.url)}:{t.policy.block_size_of(size)}")
    run = BlockPass(t, call, call.journal.acked())
    whole = hashlib.md5() if staged_block_md5s is None else None
    ids, total = _send_blocks(run, blocks, whole, staged_block_md5s)
    if size is not None and total != size:
        raise SourceInterrupted(f"source gave {total} of {size} bytes", code="source-interrupted")
    digest = base64.b64encode(whole.digest()).decode("ascii") if whole is not None else expected_md5
    assert digest is not None
    if expected_md5 is not None and digest != expected_md5:
        # The blocks are fine on the server, but they are not the file the producer staged.
        raise PermanentError(
            f"source MD5 {digest} differs from the one recorded at staging ({expected_md5}): "
            "the file changed; not committing",
            code="source-changed",
        )
    _put_block_list(run, ids, digest)
    stats = run.stats
    log.info(
        "put %d blocks (%d sent, %d already acknowledged) to %s",
        len(ids),
        stats.sent,
        stats.skipped,
        call.target.hostport,
    )
    return UploadOutcome(
        total,
        digest,
        "blocks",
        stats.sent,
        stats.skipped,
        stats.retries,
        staged_block_md5s=staged_block_md5s is not None,
    )


def _send_blocks(
    run: BlockPass, blocks: Iterator[bytes], whole: Any, staged_md5s: tuple[str, ...] | None
) -> tuple[list[str], int]:
    """Read the blocks one at a time, keep `parallel_blocks` of them in flight; return their ids
    and the bytes read. The first block that fails for good stops the others."""
    parallel = run.t.policy.parallel_blocks
    ids: list[str] = []
    total = 0
    pending: set[Future[None]] = set()
    executor = ThreadPoolExecutor(parallel, thread_name_prefix="put-block")
    try:
        for index, data in enumerate(blocks):
            if index >= MAX_BLOCKS:
                raise PermanentError(f"more than {MAX_BLOCKS} blocks", code="too-many-blocks")
            if whole is not None:
                whole.update(data)  # sequential reads: no extra pass over the file
            total += len(data)
            run.call.tracker.fence()  # a lapsed lock or a canceled job stops at its next block
            block = Block(block_id(index), data, staged_md5s[index] if staged_md5s is not None else None)
            ids.append(block.bid)
            pending.add(executor.submit(_put_block, run, block))
            del data, block
            if len(pending) >= parallel:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                _raise_first(done)
        done, pending = wait(pending)
        _raise_first(done)
    except BaseException:
        run.abort.set()
        for f in pending:
            f.cancel()
        raise
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
    return ids, total


def _put_block(run: BlockPass, block: Block) -> None:
    """Put Block with retries, unless an earlier attempt already left this very block there."""
    tracker = run.call.tracker
    # hashed here only without staging's digest (in the block thread: hashlib frees the GIL)
    digest = block.staged_md5 or md5_b64(block.data)
    if run.acked.get(block.bid) == digest:
        run.stats.bump("skipped")
        tracker.add(len(block.data))
        return

    def on_failure(err: AworkError, body: StreamBody) -> None:
        tracker.add(-body.sent)
        if (
            err.code == "Md5Mismatch"
            and block.staged_md5 is not None
            and md5_b64(block.data) != block.staged_md5
        ):
            # not corruption on the way: the bytes read now differ from those staged
            raise PermanentError(
                f"block {block.bid} no longer matches the MD5 taken at staging: the file changed "
                "after staging; not committing",
                status=err.status,
                code="source-changed",
                trace_id=err.trace_id,
            )

    run.t.put(
        Put(
            op="put-block",
            label=f"put-block {block.bid}",
            url=run.call.url,
            request_url=with_query(run.call.url, comp="block", blockid=block.bid),
            headers={"Content-MD5": digest, "Content-Length": str(len(block.data))},
            body=lambda: memory_body(block.data, tracker.add),
            ok=(201,),
            on_failure=on_failure,
            on_retry=lambda: run.stats.bump("retries"),
            abort=run.abort,
        )
    )
    run.call.journal.ack(block.bid, digest)
    run.stats.bump("sent")


def _put_block_list(run: BlockPass, ids: list[str], digest: str) -> None:
    """Commit the blocks, in order, with the content type and the whole file's MD5."""
    xml = (
        '<?xml version="1.0" encoding="utf-8"?><BlockList>'
        + "".join(f"<Latest>{i}</Latest>" for i in ids)
        + "</BlockList>"
    ).encode()
    headers = {
        "Content-Type": "application/xml",
        "Content-MD5": md5_b64(xml),
        "x-ms-blob-content-type": run.call.content_type,
        "x-ms-blob-content-md5": digest,
    }
    url = run.call.url
    run.t.put(
        Put(
            op="put-block-list",
            label="put-block-list",
            url=url,
            request_url=with_query(url, comp="blocklist"),
            headers=headers,
            body=lambda: xml,
            before=run.call.tracker.fence,
            on_retry=lambda: run.stats.bump("retries"),
        )
    )


def _raise_first(done: set[Future[None]]) -> None:
    """Raise the first real failure among finished blocks (an Aborted one only followed another)."""
    for f in done:
        exc = None if f.cancelled() else f.exception()
        if exc is not None and not isinstance(exc, Aborted):
            raise exc
