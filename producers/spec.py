"""A job spec and its validation: every field checked before anything is staged or enqueued."""

from __future__ import annotations

import mimetypes
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

from producers import text_rules
from producers.callback_url import check_callback_url
from producers.contract import SpecError, Target
from producers.priority import DEFAULT_PRIORITY, Priority, check_priority
from producers.recurring import Placement, check_placement
from producers.source_url import SourceUrlRefused, parse_http_url, source_host_refused
from producers.staging import StreamedBody

# Matched whole (`fullmatch`): `$` would let a trailing newline through.
_CONTENT_TYPE = re.compile(r"[A-Za-z0-9][\w.+-]*/[\w.+-]+( *;[\x20-\x7e]*)?", re.ASCII)
_WORKSPACE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_IDEM_KEY = re.compile(r"[\x21-\x7e]{1,200}")
# A Celery task name of the producer's own app, optionally `@queue` (default queue `celery`).
_ON_DONE = re.compile(r"[A-Za-z_][\w.:-]{0,199}(@[A-Za-z0-9_.-]{1,100})?", re.ASCII)

IMAGE_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)


def sniff_image(head: bytes) -> str | None:
    """The image MIME type from the first bytes, or None when it is no image we know."""
    for magic, mime in IMAGE_MAGIC:
        if head.startswith(magic):
            return mime
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return None


@dataclass(frozen=True)
class JobSpec:
    """What a producer asks for. `source` is a local path, raw bytes, or an http(s) URL.

    When the job ends: `callback_url` gets a signed POST (producers.callback_url; needs a
    signer, see Uploads.enqueue_many), `on_done` names a Celery task of the producer's own app
    (`name` or `name@queue`) that is sent the job as its argument."""

    source: str | Path | bytes | StreamedBody
    to: str
    workspace: str = "default"
    name: str | None = None
    description: str | None = None
    idempotency_key: str | None = None
    content_type: str | None = None
    # Recurring files (producers.recurring): new | version | skip; a file id; workers | awork.
    on_existing: str = "new"
    new_version_of: str | None = None
    via: str = "workers"
    callback_url: str | None = None
    on_done: str | None = None
    priority: str = DEFAULT_PRIORITY.value  # high | normal | bulk, within the workspace


@dataclass(frozen=True)
class ValidSpec:
    """A spec that passed every check; `path`/`url`/`data` says where the bytes are."""

    target: Target
    workspace: str
    file_name: str
    description: str | None
    idempotency_key: str | None
    content_type: str
    size: int | None
    path: Path | None = None
    url: str | None = None
    data: bytes | None = None
    placement: Placement = field(default_factory=Placement)
    streamed: StreamedBody | None = None
    callback_url: str | None = None
    on_done: str | None = None
    priority: Priority = DEFAULT_PRIORITY


def validate(
    spec: JobSpec,
    known_workspaces: set[str] | None,
    source_url_hosts: tuple[str, ...],
    callback_hosts: tuple[str, ...] = (),
) -> ValidSpec:
    """Check `spec` against the job contract before anything is staged or written; a refusal
    is a SpecError that names the field."""
    target = Target.parse(spec.to, "to")
    workspace = _workspace(spec.workspace, known_workspaces)
    idem = spec.idempotency_key
    if idem is not None:
        check_idempotency_key(idem)
    description = text_rules.description(spec.description)
    is_url = isinstance(spec.source, str) and spec.source.lower().startswith(("http://", "https://"))
    placement = check_placement(spec.on_existing, spec.new_version_of, spec.via, target, is_url)
    callback_url = check_callback_url(spec.callback_url, callback_hosts)
    on_done = spec.on_done
    if on_done is not None and not (isinstance(on_done, str) and _ON_DONE.fullmatch(on_done)):
        raise SpecError("on_done", "expected a Celery task name, optionally @queue")
    priority = check_priority(spec.priority)

    src = _read_source(spec, target, placement, source_url_hosts)
    file_name = text_rules.file_name(spec.name or src.default_name)
    if src.size is not None and src.size > target.max_bytes:
        raise SpecError(
            "path",
            f"{src.size} bytes is over the {target.max_bytes} byte cap of the {target.route.value} route",
        )
    content_type = _content_type(spec.content_type, file_name)
    if target.route.name == "IMAGE_BY_UPLOAD_ID":
        sniffed = sniff_image(src.head) if src.head is not None else None
        if src.head is not None and sniffed is None:
            raise SpecError("path", f"{file_name}: not an image (PNG, JPEG, GIF or WebP) for {target}")
        if sniffed and not spec.content_type:
            content_type = sniffed
    return ValidSpec(
        target=target,
        workspace=workspace,
        file_name=file_name,
        description=description,
        idempotency_key=idem,
        content_type=content_type,
        size=src.size,
        path=src.path,
        url=src.url,
        data=src.data,
        placement=placement,
        streamed=src.streamed,
        callback_url=callback_url,
        on_done=on_done,
        priority=priority,
    )


@dataclass(frozen=True)
class _Source:
    """A spec's source, checked: exactly one of path, url, data and streamed is set. `head`: the
    first bytes where an image route must sniff them; `default_name`: the name it suggests."""

    default_name: str
    size: int | None
    head: bytes | None = None
    path: Path | None = None
    url: str | None = None
    data: bytes | None = None
    streamed: StreamedBody | None = None


def _read_source(
    spec: JobSpec, target: Target, placement: Placement, source_url_hosts: tuple[str, ...]
) -> _Source:
    src = spec.source
    if isinstance(src, StreamedBody):
        return _Source(spec.name or src.path.name, src.size, src.head, streamed=src)
    if isinstance(src, bytes | bytearray):
        data = bytes(src)
        if not data:
            raise SpecError("source", "no bytes given (awork does not take empty files)")
        if not spec.name:
            raise SpecError("name", "required when the source is raw bytes")
        return _Source(spec.name, len(data), data[:16], data=data)
    if isinstance(src, str) and src.lower().startswith(("http://", "https://")):
        # via awork: the workers never fetch it, so their allow-list does not apply; the public
        # check (producers.public_source) runs at enqueue and in the worker instead
        url = _checked_url(src) if placement.via == "awork" else _source_url(src, source_url_hosts)
        return _Source(Path(unquote(urlsplit(url).path)).name, None, url=url)
    if isinstance(src, str | Path):
        from producers.staging import check_local_file

        path = Path(src).expanduser()
        image = target.route.name == "IMAGE_BY_UPLOAD_ID"
        size, first = check_local_file(path, "path", head=16 if image else 0)
        return _Source(path.name, size, first if image else None, path=path)
    raise SpecError("source", f"expected a path, bytes or an http(s) URL, got {type(src).__name__}")


def check_idempotency_key(idem: object, field: str = "idempotency_key") -> str:
    if not (isinstance(idem, str) and _IDEM_KEY.fullmatch(idem)):
        raise SpecError(field, "1 to 200 printable ASCII characters without spaces")
    return idem


def _workspace(name: str, known: set[str] | None) -> str:
    if not isinstance(name, str) or not _WORKSPACE.fullmatch(name):
        raise SpecError("workspace", f"malformed workspace name {name!r}")
    if known is not None and name not in known:
        listed = ", ".join(sorted(known)) or "none"
        raise SpecError("workspace", f"unknown workspace {name!r} (known: {listed})")
    return name


def check_content_type(given: object, field: str = "content_type") -> str:
    """A MIME type as a header can carry it: printable ASCII, matched whole."""
    if not isinstance(given, str) or not _CONTENT_TYPE.fullmatch(given):
        raise SpecError(field, f"malformed MIME type {given!r}")
    return given


def _content_type(given: str | None, file_name: str) -> str:
    if given is not None:
        return check_content_type(given)
    guessed, _ = mimetypes.guess_type(file_name)
    return guessed or "application/octet-stream"


def _checked_url(url: str) -> str:
    try:
        parse_http_url(url)
    except SourceUrlRefused as exc:
        raise SpecError("source", str(exc)) from None
    return url


def _source_url(url: str, allowed: tuple[str, ...]) -> str:
    """The URL when it passes the check the workers make too (producers.source_url)."""
    refused = source_host_refused(url, allowed)
    if refused:
        raise SpecError("source", refused)
    return url
