"""Step 2's transfer engine: PUT a source's bytes to awork's pre-signed (Azure Blob SAS) URL.

Why it is more than `curl --data-binary @file`:
- memory stays flat whatever the size: files are streamed, blocks are read one at a time and at
  most `parallel_blocks` of them are held in memory;
- a PUT that dies at 90% does not start from zero: large sources go up as Put Block / Put Block
  List, and every acknowledged block is recorded in a `BlockJournal`, so a retried or redelivered
  step resumes;
- a corrupted upload is never linked: every request carries a Content-MD5 the server verifies
  (a block corrupted in flight is sent again), and the committed blob gets the whole file's MD5;
- the URL is a write credential for one foreign host: it only goes to allow-listed hosts, never
  with an Authorization header, and it is never logged (see `redact_url`).

Routes:
- size <= `single_put_threshold` (64 MiB, as Azure's SDK): one streamed Put Blob with a
  Content-MD5 computed beforehand;
- larger: Put Block (`block_size`, `parallel_blocks` in flight, each with its MD5 and retries),
  then Put Block List with `x-ms-blob-content-type` and `x-ms-blob-content-md5`;
- a host that refuses block operations (not for expiry) gets one streamed Put Blob instead, and
  is remembered in a `FallbackStore` so later uploads go there directly.

URL sources (`UrlSource`) are never written to disk. Content-MD5 has to be sent before the body,
so a URL source is only sent as one Put Blob when it fits in one block (it is then held in memory:
at most `block_size`); otherwise it goes up as blocks, each block's MD5 computed from the bytes
in memory. Only when the host refuses blocks is a large URL source sent as one streamed Put Blob
without Content-MD5: its MD5 is computed while streaming and compared with the Content-MD5 the
server returns (Azure computes it for Put Blob); a mismatch is a TransientError, so the upload is
retried and never linked. A URL source of unknown size on such a host is the one case spooled to a
temporary file (Put Blob needs a Content-Length).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import logging
import random
import re
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import requests
from requests.adapters import HTTPAdapter

from producers.block_digests import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_SINGLE_PUT_THRESHOLD,
    MAX_BLOCKS,
    block_size_for,
)
from producers.source_url import SourceAddress, SourceUrlRefused, host_allowed, parse_http_url
from workers.block_journal import BlockJournal, MemoryBlockJournal
from workers.error_text import transport_error
from workers.errors import AworkError, PermanentError, TransientError, UploadUrlExpired
from workers.sources import (
    ByteSource,
    FileSource,
    SourceInterrupted,
    SourceReader,
    iter_blocks,
    md5_b64,
    read_exact,
)

log = logging.getLogger(__name__)

MiB = 1024 * 1024
MAX_BLOCK_SIZE = 4000 * MiB
MAX_SINGLE_PUT = 5000 * MiB
SEND_CHUNK = 1 * MiB  # bytes per socket write (urllib3's default is 16 KiB: too many syscalls)
USER_AGENT = "awork-uploads/blob"

# 403 codes that mean "this SAS is no good any more" (Azure; Azurite's spelling): get a new URL.
EXPIRY_CODES = frozenset({"AuthenticationFailed", "AuthorizationFailure"})
# Codes with which a host says "no Put Block / Put Block List here" (not an expiry).
BLOCK_REFUSAL_CODES = frozenset(
    {
        "InvalidQueryParameterValue",
        "UnsupportedQueryParameter",
        "UnsupportedHeader",
        "UnsupportedHttpVerb",
        "FeatureNotSupported",
        "NotImplemented",
        "OperationNotAllowedOnTheBlobType",
    }
)
BLOCK_REFUSAL_STATUSES = frozenset({405, 501})

ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class TransferPolicy:
    """How a transfer is cut up and retried. Defaults follow Azure's SDK."""

    single_put_threshold: int = DEFAULT_SINGLE_PUT_THRESHOLD
    block_size: int = DEFAULT_BLOCK_SIZE
    parallel_blocks: int = 4
    block_retries: int = 4  # retries per request (block, block list, single PUT) in this call
    connect_timeout: float = 10.0
    read_timeout: float = 120.0
    retry_backoff: float = 0.5  # full jitter: sleep uniform(0, min(max, backoff * 2**attempt))
    retry_backoff_max: float = 20.0
    progress_interval: float = 0.25  # at most ~4 progress calls a second (plus the last one)
    source_restarts: int = 2  # a source stream broken beyond repair restarts the pass this often

    def __post_init__(self) -> None:
        if not 0 < self.block_size <= MAX_BLOCK_SIZE:
            raise ValueError(f"block_size must be in (0, {MAX_BLOCK_SIZE}]")
        if not 0 <= self.single_put_threshold <= MAX_SINGLE_PUT:
            raise ValueError(f"single_put_threshold must be in [0, {MAX_SINGLE_PUT}]")
        if self.parallel_blocks < 1 or self.block_retries < 0:
            raise ValueError("parallel_blocks must be >= 1 and block_retries >= 0")

    @property
    def timeout(self) -> tuple[float, float]:
        return (self.connect_timeout, self.read_timeout)


@dataclass(frozen=True)
class UploadOutcome:
    """What was put: the caller records it in the job record."""

    size: int
    md5_b64: str
    mode: Literal["single", "blocks"]
    blocks_sent: int = 0
    blocks_skipped: int = 0  # acknowledged by an earlier attempt (journal) and not sent again
    retries: int = 0  # requests repeated inside this call (transient errors, MD5 mismatches)
    fell_back: bool = False  # the host refused blocks (now or earlier): one Put Blob instead
    staged_block_md5s: bool = False  # blocks sent with staging's MD5s: nothing hashed here


# -- the "this host refuses blocks" memory -----------------------------------------------------


@runtime_checkable
class FallbackStore(Protocol):
    """Remembers upload hosts that refuse block operations, so later uploads skip the attempt."""

    def refuses_blocks(self, host: str) -> bool: ...

    def remember_refusal(self, host: str, reason: str) -> None: ...


class MemoryFallbackStore:
    """Process-level memory (the default)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._hosts: dict[str, str] = {}

    def refuses_blocks(self, host: str) -> bool:
        with self._lock:
            return host.lower() in self._hosts

    def remember_refusal(self, host: str, reason: str) -> None:
        with self._lock:
            self._hosts[host.lower()] = reason

    def forget(self, host: str | None = None) -> None:
        with self._lock:
            if host is None:
                self._hosts.clear()
            else:
                self._hosts.pop(host.lower(), None)


PROCESS_FALLBACKS = MemoryFallbackStore()


class RedisFallbackStore:
    """Fleet-wide memory in Redis (`awork:blobhost:{host}:no-blocks`), cached in this process.

    Expires after `ttl` so a host that starts accepting blocks is tried again one day.
    """

    def __init__(self, client: Any, ttl: int = 24 * 3600, local: MemoryFallbackStore | None = None) -> None:
        self.client = client
        self.ttl = ttl
        self.local = local or MemoryFallbackStore()

    @staticmethod
    def key(host: str) -> str:
        return f"awork:blobhost:{host.lower()}:no-blocks"

    def refuses_blocks(self, host: str) -> bool:
        if self.local.refuses_blocks(host):
            return True
        reason = self.client.get(self.key(host))
        if reason is None:
            return False
        self.local.remember_refusal(host, reason.decode() if isinstance(reason, bytes) else reason)
        return True

    def remember_refusal(self, host: str, reason: str) -> None:
        self.local.remember_refusal(host, reason)
        self.client.set(self.key(host), reason[:200], ex=self.ttl)


# -- URLs ------------------------------------------------------------------------------------

def check_upload_url(url: str, allowed_hosts: Collection[str]) -> SourceAddress:
    """PermanentError unless `url` is http(s), unambiguous, has no userinfo and its host:port is
    allowed. The same parse and allow-list rule as source URLs (producers.source_url): an entry
    without a port allows the scheme's default port (80/443) only.
    """
    try:
        address = parse_http_url(url)
    except SourceUrlRefused as exc:
        raise PermanentError(f"upload URL refused: {exc}", code="upload-url-invalid") from None
    if not host_allowed(address, allowed_hosts):
        raise PermanentError(
            f"upload host {address.hostport} is not in AWORK_UPLOAD_HOSTS", code="upload-host-refused"
        )
    return address


def url_expiry(url: str) -> dt.datetime | None:
    """The SAS `se=` expiry of an upload URL (UTC), or None when absent or unreadable."""
    values = parse_qs(urlsplit(url).query).get("se")
    if not values:
        return None
    text = values[0].strip()
    try:
        if len(text) == 10:  # a date alone: valid until that day starts (Azure's reading)
            return dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC)
        parsed = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def _check_not_expired(url: str) -> None:
    expiry = url_expiry(url)
    if expiry is not None and expiry <= dt.datetime.now(dt.UTC):
        raise UploadUrlExpired(f"upload URL expired at {expiry.isoformat()}", code="upload-url-expired")


def upload_identity(url: str) -> str:
    """A hash of the blob's address (host and path): the same blob whatever the signature."""
    parts = urlsplit(url)
    address = f"{(parts.hostname or '').lower()}:{parts.port or ''}{parts.path}"
    return hashlib.sha256(address.encode()).hexdigest()[:32]


def _with_query(url: str, **params: str) -> str:
    parts = urlsplit(url)
    extra = urlencode(params)
    query = f"{parts.query}&{extra}" if parts.query else extra
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))


def block_id(index: int) -> str:
    """Azure wants base64 ids of one length per blob: a fixed-width counter gives that."""
    return base64.b64encode(f"{index:08d}".encode()).decode("ascii")


# -- HTTP plumbing ---------------------------------------------------------------------------


class _BlobAdapter(HTTPAdapter):
    """Bigger socket writes than urllib3's 16 KiB default, no hidden urllib3 retries."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("blocksize", SEND_CHUNK)
        super().init_poolmanager(*args, **kwargs)


def plain_session() -> requests.Session:
    """A session for the upload host: no auth, no netrc or proxies from the environment."""
    session = requests.Session()
    session.trust_env = False
    session.auth = None
    adapter = _BlobAdapter(max_retries=0, pool_connections=1, pool_maxsize=4)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers["User-Agent"] = USER_AGENT
    return session


class _Sessions:
    """One session per concurrent request (requests.Session is not meant to be shared by threads)."""

    def __init__(self, factory: Callable[[], requests.Session]) -> None:
        self._factory = factory
        self._lock = threading.Lock()
        self._free: list[requests.Session] = []
        self._all: list[requests.Session] = []

    @contextmanager
    def get(self) -> Iterator[requests.Session]:
        with self._lock:
            session = self._free.pop() if self._free else None
        if session is None:
            session = self._factory()
            session.trust_env = False  # whatever the factory did: no netrc/env credentials
            with self._lock:
                self._all.append(session)
        try:
            yield session
        finally:
            with self._lock:
                self._free.append(session)

    def close(self) -> None:
        with self._lock:
            sessions, self._all, self._free = self._all, [], []
        for s in sessions:
            s.close()


_STRIPPED_HEADERS = ("Authorization", "Proxy-Authorization", "Cookie")


class _Body:
    """A streamed request body of known length that reports bytes as the socket takes them."""

    def __init__(
        self, read: Callable[[int], bytes | memoryview], length: int, on_bytes: Callable[[int], None]
    ) -> None:
        self._read = read
        self._left = length
        self._on_bytes = on_bytes
        self.sent = 0

    def __len__(self) -> int:  # requests and MultipartEncoder want the remaining length
        return self._left

    def read(self, n: int = -1) -> bytes | memoryview:
        if self._left <= 0:
            return b""
        n = self._left if n is None or n < 0 else min(n, self._left)
        data = self._read(n)
        if not data:
            raise SourceInterrupted(f"source ended {self._left} bytes early", code="source-interrupted")
        self._left -= len(data)
        self.sent += len(data)
        self._on_bytes(len(data))
        return data

    def __iter__(self) -> Iterator[bytes | memoryview]:
        while chunk := self.read(SEND_CHUNK):
            yield chunk


def _memory_reader(data: bytes) -> Callable[[int], memoryview]:
    view = memoryview(data)
    pos = 0

    def read(n: int) -> memoryview:
        nonlocal pos
        chunk = view[pos : pos + n]
        pos += len(chunk)
        return chunk

    return read


_CODE_RE = re.compile(rb"<Code>\s*([^<\s]+)\s*</Code>")


def _error_from(resp: requests.Response, op: str) -> AworkError:
    """Classify a non-2xx answer of the upload host."""
    status = resp.status_code
    body = resp.content[:8192] if resp.content else b""
    code = resp.headers.get("x-ms-error-code")
    if not code:
        m = _CODE_RE.search(body)
        code = m.group(1).decode(errors="replace") if m else None
    trace = resp.headers.get("x-ms-request-id")
    msg = f"{op}: upload host answered {status}" + (f" {code}" if code else "")
    kwargs: dict[str, Any] = {"status": status, "code": code, "trace_id": trace}
    if status == 403 and code in EXPIRY_CODES:
        return UploadUrlExpired(msg, **kwargs)
    if op in ("put-block", "put-block-list") and (
        status in BLOCK_REFUSAL_STATUSES
        or (status == 400 and code in BLOCK_REFUSAL_CODES)
        or (status == 403 and code == "AuthorizationPermissionMismatch")
    ):
        return _BlocksRefused(msg, **kwargs)
    if status == 400 and code == "Md5Mismatch":
        return TransientError(msg + " (corrupted in flight)", **kwargs)
    if op == "put-block-list" and status == 400 and code == "InvalidBlockList":
        return _BlocksLost(msg, **kwargs)
    if status in (408, 429) or status >= 500:
        retry_after = resp.headers.get("Retry-After")
        delay = float(retry_after) if retry_after and retry_after.isdigit() else None
        return TransientError(msg, retry_after=delay, **kwargs)
    return PermanentError(msg, **kwargs)


class _BlocksRefused(AworkError):
    """The host does not do Put Block / Put Block List: fall back to one Put Blob."""


class _BlocksLost(AworkError):
    """Put Block List names blocks the server no longer has: forget the journal and resend."""


class _Aborted(Exception):
    """Another block failed for good: this one stops quietly."""


_TRANSIENT_EXC: tuple[type[BaseException], ...] = (
    requests.exceptions.ConnectionError,
    requests.exceptions.Timeout,
    requests.exceptions.ChunkedEncodingError,
    requests.exceptions.ContentDecodingError,
)


def _no_fence() -> None:
    return None


class _Progress:
    """One upload call's state shared by its threads: counts bytes from any of them, calls the
    callback at most every `interval` seconds, and holds the caller's `fence`."""

    def __init__(
        self, callback: ProgressFn | None, interval: float, fence: Callable[[], None] | None = None
    ) -> None:
        self._cb = callback
        self._interval = interval
        self.fence = fence if fence is not None else _no_fence
        self._lock = threading.Lock()
        self._cb_lock = threading.Lock()
        self.total = 0
        self.done = 0
        self._last = 0.0

    def add(self, n: int) -> None:
        with self._lock:
            self.done += n
            now = time.monotonic()
            due = self._cb is not None and now - self._last >= self._interval
            if due:
                self._last = now
            done, total = self.done, self.total
        if due and self._cb_lock.acquire(blocking=False):
            try:
                assert self._cb is not None
                self._cb(done, total)
            finally:
                self._cb_lock.release()

    def reset(self, total: int) -> None:
        with self._lock:
            self.total = total
            self.done = 0

    def finish(self, size: int | None = None) -> None:
        """The last call: everything is on the server (a URL source's size is known by now)."""
        with self._lock:
            if size is not None:
                self.total = self.done = size
            done, total = self.done, self.total
        if self._cb is not None:
            with self._cb_lock:
                self._cb(done, total)


@dataclass
class _Stats:
    lock: threading.Lock = field(default_factory=threading.Lock)
    sent: int = 0
    skipped: int = 0
    retries: int = 0

    def bump(self, what: str) -> None:
        with self.lock:
            setattr(self, what, getattr(self, what) + 1)


# -- the uploader ---------------------------------------------------------------------------


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
        self._sessions = _Sessions(session_factory or plain_session)
        self.fallbacks: FallbackStore = fallback_store or PROCESS_FALLBACKS
        self.spool_dir = spool_dir

    def close(self) -> None:
        self._sessions.close()

    def __enter__(self) -> BlobUploader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- public ------------------------------------------------------------------------------

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
        _check_not_expired(url)
        journal = journal if journal is not None else MemoryBlockJournal()
        tracker = _Progress(progress, self.policy.progress_interval, fence)
        restarts = 0
        lost_once = False
        while True:
            try:
                outcome = self._upload_once(url, target, source, content_type, journal, tracker)
            except SourceInterrupted:
                restarts += 1
                if restarts > self.policy.source_restarts:
                    raise
                log.warning("source %s broke; restarting the upload pass (%d)", source.label, restarts)
                continue
            except _BlocksLost as exc:
                if lost_once:
                    raise PermanentError(
                        str(exc), status=exc.status, code=exc.code, trace_id=exc.trace_id
                    ) from exc
                lost_once = True
                log.warning("upload host lost uncommitted blocks (%s); sending them all again", exc.code)
                journal.reset()
                continue
            tracker.finish(outcome.size)
            return outcome

    # -- routing -----------------------------------------------------------------------------

    def _upload_once(
        self,
        url: str,
        target: SourceAddress,
        source: ByteSource,
        content_type: str,
        journal: BlockJournal,
        tracker: _Progress,
    ) -> UploadOutcome:
        blocks_ok = not self.fallbacks.refuses_blocks(target.hostport)
        if source.rereadable:
            return self._upload_rereadable(url, target, source, content_type, journal, tracker, blocks_ok)

        reader = source.open()
        try:
            size = reader.size
            block_size = self._block_size_for(size)
            tracker.reset(size or 0)
            if not blocks_ok and (size is None or size > block_size):
                return self._single_streamed(url, source, reader, content_type, tracker)
            first = read_exact(reader, block_size)
            if len(first) < block_size:  # the whole source fits in one block: hold it in memory
                if size is not None and len(first) != size:
                    raise SourceInterrupted(
                        f"source {source.label} gave {len(first)} of {size} bytes", code="source-interrupted"
                    )
                digest = md5_b64(first)
                self._single_put(
                    url,
                    lambda: _Body(_memory_reader(first), len(first), tracker.add),
                    len(first),
                    digest,
                    content_type,
                    tracker,
                )
                return UploadOutcome(len(first), digest, "single")
            try:
                return self._blocks(
                    url,
                    target,
                    _chain_first(first, reader, block_size),
                    size,
                    content_type,
                    journal,
                    tracker,
                )
            except _BlocksRefused as exc:
                self._remember_refusal(target, exc)
        finally:
            reader.close()
        reader = source.open()
        try:
            return self._single_streamed(url, source, reader, content_type, tracker)
        finally:
            reader.close()

    def _upload_rereadable(
        self,
        url: str,
        target: SourceAddress,
        source: ByteSource,
        content_type: str,
        journal: BlockJournal,
        tracker: _Progress,
        blocks_ok: bool,
    ) -> UploadOutcome:
        probe = source.open()
        size = probe.size
        probe.close()
        if size is None:  # a re-readable source of unknown size: treat it as a stream
            raise PermanentError(f"source {source.label} has no size", code="source-invalid")
        tracker.reset(size)
        if size > self.policy.single_put_threshold and blocks_ok:
            block_size = self._block_size_for(size)
            expected_md5 = source.known_md5 if isinstance(source, FileSource) else None
            staged = source.block_digests if isinstance(source, FileSource) else None
            if staged is not None and not staged.fits(size, block_size, expected_md5):
                log.info("staging's block MD5s do not fit %s: hashing the blocks here", source.label)
                staged = None
            reader = source.open()
            try:
                return self._blocks(
                    url,
                    target,
                    iter_blocks(reader, block_size),
                    size,
                    content_type,
                    journal,
                    tracker,
                    expected_md5=expected_md5,
                    staged_block_md5s=staged.blocks if staged is not None else None,
                )
            except _BlocksRefused as exc:
                self._remember_refusal(target, exc)
            finally:
                reader.close()
        digest = source.md5_b64() if isinstance(source, FileSource) else _md5_of(source)
        if size > MAX_SINGLE_PUT:
            raise PermanentError(
                f"{size} bytes is above Azure's single Put Blob limit and the host refuses blocks",
                code="too-large-for-single-put",
            )

        readers: list[SourceReader] = []

        def body() -> _Body | bytes:
            if size == 0:
                return b""
            reader = source.open()
            readers.append(reader)
            return _Body(reader.read, size, tracker.add)

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
            self._single_put(url, body, size, digest, content_type, tracker, recheck)
        finally:
            for r in readers:
                r.close()
        return UploadOutcome(size, digest, "single", fell_back=size > self.policy.single_put_threshold)

    def _remember_refusal(self, target: SourceAddress, exc: AworkError) -> None:
        reason = f"{exc.status} {exc.code or ''}".strip()
        log.warning(
            "upload host %s refuses block operations (%s): one Put Blob instead", target.hostport, reason
        )
        self.fallbacks.remember_refusal(target.hostport, reason)

    def _block_size_for(self, size: int | None) -> int:
        return self.policy.block_size if size is None else block_size_for(size, self.policy.block_size)

    # -- single Put Blob ----------------------------------------------------------------------

    def _single_put(
        self,
        url: str,
        body: Callable[[], Any],
        size: int,
        digest: str | None,
        content_type: str,
        tracker: _Progress,
        on_md5_mismatch: Callable[[AworkError], None] | None = None,
        verify: Callable[[requests.Response], AworkError | None] | None = None,
    ) -> requests.Response:
        """Put Blob with retries; `body()` gives a fresh body per attempt.

        `verify` may turn a 201 into an error (a server MD5 that differs from the streamed one).
        """
        headers = {"x-ms-blob-type": "BlockBlob", "Content-Type": content_type, "Content-Length": str(size)}
        if digest is not None:
            headers["Content-MD5"] = digest
        attempt = 0
        while True:
            _check_not_expired(url)
            tracker.fence()
            tracker.reset(size)
            err: AworkError
            try:
                with self._sessions.get() as session:
                    resp = self._send(session, url, headers, body())
            except _TRANSIENT_EXC as exc:
                err = TransientError(transport_error("put-blob", exc, url), code="connection")
            else:
                if resp.status_code in (200, 201):
                    problem = verify(resp) if verify is not None else None
                    if problem is None:
                        return resp
                    err = problem
                else:
                    err = _error_from(resp, "put-blob")
                if not isinstance(err, TransientError):
                    raise err
                if err.code == "Md5Mismatch" and on_md5_mismatch is not None:
                    on_md5_mismatch(err)
            attempt += 1
            if attempt > self.policy.block_retries:
                raise err
            self._sleep_backoff(attempt, err, None)

    def _single_streamed(
        self, url: str, source: ByteSource, reader: SourceReader, content_type: str, tracker: _Progress
    ) -> UploadOutcome:
        """One Put Blob from a stream: MD5 computed on the way, checked against the server's."""
        size = reader.size
        if size is None:
            return self._single_spooled(url, source, reader, content_type, tracker)
        if size > MAX_SINGLE_PUT:
            raise PermanentError(
                f"{size} bytes is above Azure's single Put Blob limit and the host refuses blocks",
                code="too-large-for-single-put",
            )
        readers = [reader]
        digests: list[Any] = []

        def body() -> _Body:
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

            return _Body(read, size, tracker.add)

        def verify(resp: requests.Response) -> AworkError | None:
            local = base64.b64encode(digests[-1].digest()).decode("ascii")
            echoed = resp.headers.get("Content-MD5")
            if echoed is None:
                log.warning("upload host returned no Content-MD5: %s is not verified", source.label)
            elif echoed != local:
                return TransientError(
                    f"put-blob: server MD5 {echoed} != streamed MD5 {local}: corrupted on the way",
                    status=resp.status_code,
                    code="Md5Mismatch",
                    trace_id=resp.headers.get("x-ms-request-id"),
                )
            return None

        try:
            self._single_put(url, body, size, None, content_type, tracker, verify=verify)
            local = base64.b64encode(digests[-1].digest()).decode("ascii")
            return UploadOutcome(size, local, "single", fell_back=True)
        finally:
            for r in readers[1:]:
                r.close()

    def _single_spooled(
        self, url: str, source: ByteSource, reader: SourceReader, content_type: str, tracker: _Progress
    ) -> UploadOutcome:
        """Unknown size on a host without blocks: Put Blob needs a length, so spool to disk once."""
        with tempfile.NamedTemporaryFile(dir=self.spool_dir, prefix="awork-spool-") as tmp:
            h = hashlib.md5()
            while chunk := reader.read(SEND_CHUNK):
                h.update(chunk)
                tmp.write(chunk)
            tmp.flush()
            spooled = FileSource(tmp.name, md5_b64=base64.b64encode(h.digest()).decode("ascii"))
            target = check_upload_url(url, self.allowed_hosts)
            with spooled:
                return self._upload_rereadable(
                    url, target, spooled, content_type, MemoryBlockJournal(), tracker, blocks_ok=False
                )

    # -- Put Block / Put Block List ----------------------------------------------------------

    def _blocks(
        self,
        url: str,
        target: SourceAddress,
        blocks: Iterator[bytes],
        size: int | None,
        content_type: str,
        journal: BlockJournal,
        tracker: _Progress,
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
        policy = self.policy
        block_size = self._block_size_for(size)
        journal.begin(f"{upload_identity(url)}:{block_size}")
        acked = journal.acked()
        whole = hashlib.md5()
        ids: list[str] = []
        total = 0
        stats = _Stats()
        abort = threading.Event()
        pending: set[Future[None]] = set()
        executor = ThreadPoolExecutor(policy.parallel_blocks, thread_name_prefix="put-block")
        try:
            for index, data in enumerate(blocks):
                if index >= MAX_BLOCKS:
                    raise PermanentError(f"more than {MAX_BLOCKS} blocks", code="too-many-blocks")
                if staged_block_md5s is None:
                    whole.update(data)  # sequential reads: no extra pass over the file
                    staged = None
                else:
                    staged = staged_block_md5s[index]
                total += len(data)
                tracker.fence()  # a lapsed lock or a canceled job stops at its next block
                bid = block_id(index)
                ids.append(bid)
                pending.add(
                    executor.submit(
                        self._put_block,
                        url,
                        bid,
                        data,
                        staged,
                        acked.get(bid),
                        journal,
                        abort,
                        stats,
                        tracker,
                    )
                )
                del data
                if len(pending) >= policy.parallel_blocks:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    _raise_first(done)
            done, pending = wait(pending)
            _raise_first(done)
        except BaseException:
            abort.set()
            for f in pending:
                f.cancel()
            raise
        finally:
            executor.shutdown(wait=True, cancel_futures=True)
        if size is not None and total != size:
            raise SourceInterrupted(f"source gave {total} of {size} bytes", code="source-interrupted")
        if staged_block_md5s is not None:
            assert expected_md5 is not None
            digest = expected_md5
        else:
            digest = base64.b64encode(whole.digest()).decode("ascii")
        if expected_md5 is not None and digest != expected_md5:
            # The blocks are fine on the server, but they are not the file the producer staged.
            raise PermanentError(
                f"source MD5 {digest} differs from the one recorded at staging ({expected_md5}): "
                "the file changed; not committing",
                code="source-changed",
            )
        self._put_block_list(url, ids, digest, content_type, stats, tracker)
        log.info(
            "put %d blocks (%d sent, %d already acknowledged) to %s",
            len(ids),
            stats.sent,
            stats.skipped,
            target.hostport,
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

    def _put_block(
        self,
        url: str,
        bid: str,
        data: bytes,
        staged_md5: str | None,
        acked_md5: str | None,
        journal: BlockJournal,
        abort: threading.Event,
        stats: _Stats,
        tracker: _Progress,
    ) -> None:
        # hashed here only without staging's digest (in the block thread: hashlib frees the GIL)
        digest = staged_md5 or md5_b64(data)
        if acked_md5 == digest:
            stats.bump("skipped")
            tracker.add(len(data))
            return
        block_url = _with_query(url, comp="block", blockid=bid)
        headers = {"Content-MD5": digest, "Content-Length": str(len(data))}
        attempt = 0
        while True:
            if abort.is_set():
                raise _Aborted()
            _check_not_expired(url)
            body = _Body(_memory_reader(data), len(data), tracker.add)
            err: AworkError
            try:
                with self._sessions.get() as session:
                    resp = self._send(session, block_url, headers, body)
            except _TRANSIENT_EXC as exc:
                err = TransientError(transport_error(f"put-block {bid}", exc, url), code="connection")
            else:
                if resp.status_code == 201:
                    journal.ack(bid, digest)
                    stats.bump("sent")
                    return
                err = _error_from(resp, "put-block")
                if err.code == "Md5Mismatch" and staged_md5 is not None and md5_b64(data) != staged_md5:
                    # not corruption on the way: the bytes read now differ from those staged
                    tracker.add(-body.sent)
                    raise PermanentError(
                        f"block {bid} no longer matches the MD5 taken at staging: the file changed "
                        "after staging; not committing",
                        status=err.status,
                        code="source-changed",
                        trace_id=err.trace_id,
                    )
                if not isinstance(err, TransientError):
                    tracker.add(-body.sent)
                    raise err
            tracker.add(-body.sent)
            attempt += 1
            if attempt > self.policy.block_retries:
                raise err
            stats.bump("retries")
            log.info("put-block %s: %s; retry %d", bid, err, attempt)
            self._sleep_backoff(attempt, err, abort)

    def _put_block_list(
        self, url: str, ids: list[str], digest: str, content_type: str, stats: _Stats, tracker: _Progress
    ) -> None:
        xml = (
            '<?xml version="1.0" encoding="utf-8"?><BlockList>'
            + "".join(f"<Latest>{i}</Latest>" for i in ids)
            + "</BlockList>"
        ).encode()
        headers = {
            "Content-Type": "application/xml",
            "Content-MD5": md5_b64(xml),
            "x-ms-blob-content-type": content_type,
            "x-ms-blob-content-md5": digest,
        }
        list_url = _with_query(url, comp="blocklist")
        attempt = 0
        while True:
            _check_not_expired(url)
            tracker.fence()
            err: AworkError
            try:
                with self._sessions.get() as session:
                    resp = self._send(session, list_url, headers, xml)
            except _TRANSIENT_EXC as exc:
                err = TransientError(transport_error("put-block-list", exc, url), code="connection")
            else:
                if resp.status_code in (200, 201):
                    return
                err = _error_from(resp, "put-block-list")
                if not isinstance(err, TransientError):
                    raise err
            attempt += 1
            if attempt > self.policy.block_retries:
                raise err
            stats.bump("retries")
            self._sleep_backoff(attempt, err, None)

    # -- helpers -----------------------------------------------------------------------------

    def _send(
        self, session: requests.Session, url: str, headers: dict[str, str], body: Any
    ) -> requests.Response:
        """PUT without redirects, without any credential header whatever the session carries."""
        prepared = session.prepare_request(requests.Request("PUT", url, headers=headers, data=body))
        for name in _STRIPPED_HEADERS:
            prepared.headers.pop(name, None)
        resp = session.send(prepared, timeout=self.policy.timeout, allow_redirects=False)
        resp.close()  # bodies of blob answers are tiny and already read
        return resp

    def _sleep_backoff(self, attempt: int, err: AworkError, abort: threading.Event | None) -> None:
        p = self.policy
        delay = random.uniform(0, min(p.retry_backoff_max, p.retry_backoff * 2 ** (attempt - 1)))
        if isinstance(err, TransientError) and err.retry_after:
            delay = max(delay, min(err.retry_after, p.retry_backoff_max))
        if abort is not None:
            if abort.wait(delay):
                raise _Aborted()
        else:
            time.sleep(delay)


def _raise_first(done: set[Future[None]]) -> None:
    errors = [f.exception() for f in done if not f.cancelled() and f.exception() is not None]
    real = [e for e in errors if not isinstance(e, _Aborted)]
    if real:
        raise real[0]  # type: ignore[misc]


def _chain_first(first: bytes, reader: SourceReader, block_size: int) -> Iterator[bytes]:
    yield first
    yield from iter_blocks(reader, block_size)


def _md5_of(source: ByteSource) -> str:
    reader = source.open()
    try:
        h = hashlib.md5()
        while chunk := reader.read(SEND_CHUNK):
            h.update(chunk)
        return base64.b64encode(h.digest()).decode("ascii")
    finally:
        reader.close()


__all__ = [
    "BLOCK_REFUSAL_CODES",
    "EXPIRY_CODES",
    "PROCESS_FALLBACKS",
    "BlobUploader",
    "FallbackStore",
    "MemoryFallbackStore",
    "RedisFallbackStore",
    "TransferPolicy",
    "UploadOutcome",
    "block_id",
    "check_upload_url",
    "plain_session",
    "upload_identity",
    "url_expiry",
]
