"""Everything the sandbox remembers: entities, uploads (blobs and blocks), files, counters.

In memory, one event loop, no locks beyond per-upload commit locks: a sandbox restart starts
from nothing (the data directory only holds bytes). Counters are what tests assert on, so
they count what was sent, not what was meant.
"""

from __future__ import annotations

import asyncio
import shutil
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .content import Content

# Admin entity types (awork path segments) and what FileInfo calls them.
ENTITY_TYPES: dict[str, str] = {
    "tasks": "task",
    "projects": "project",
    "documents": "document",
    "tasktemplates": "taskTemplate",
    "companies": "company",
    "users": "user",
    "workspaces": "workspace",
    "projecttemplates": "projectTemplate",
    "contactpersons": "contactPerson",
}
# FileInfo's owner id field per entity type (workspaces and contact persons have none).
OWNER_FIELDS: dict[str, str] = {
    "tasks": "taskId",
    "projects": "projectId",
    "documents": "documentId",
    "tasktemplates": "taskTemplateId",
    "companies": "companyId",
    "users": "userId",
    "projecttemplates": "projectTemplateId",
}
ALL_OWNER_FIELDS = (
    "projectId", "projectTemplateId", "companyId", "taskId", "taskTemplateId", "userId",
    "documentId",
)


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


_last_second: list[Any] = [0, ""]


def _iso_seconds() -> str:
    """now, to the second, formatted once per second (generateuploadurl is a hot path)."""
    sec = int(time.time())
    if _last_second[0] != sec:
        _last_second[0] = sec
        _last_second[1] = datetime.fromtimestamp(sec, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return str(_last_second[1])


@dataclass
class Block:
    block_id: str  # base64, as the client sent it
    size: int
    md5: bytes
    path: Path


@dataclass(slots=True)
class Upload:
    """One generated upload URL: its blob's committed content and its blocks.

    Every write lands in a new file and a commit switches `content` to a new Content, so a
    file linked from an upload keeps its bytes (without a copy) when the blob is overwritten.
    """

    upload_id: str
    workspace: str
    created_on: str
    expires: str
    dir: Path
    content: Content | None = None  # the committed bytes; replaced, never rewritten
    content_md5: str | None = None  # the blob's Content-MD5 property (base64), as Azure keeps it
    content_type: str | None = None
    etag: str = ""
    last_modified: str = ""
    blob_puts: int = 0
    committed_blocks: list[Block] = field(default_factory=list)
    uncommitted: dict[str, Block] = field(default_factory=dict)
    block_id_len: int | None = None  # all block ids of a blob decode to the same length
    linked: set[Path] = field(default_factory=set)  # files that stored files point at
    _seq: int = 0
    _lock: asyncio.Lock | None = None

    @property
    def committed(self) -> bool:
        return self.content is not None

    @property
    def size(self) -> int:
        return self.content.size if self.content is not None else 0

    @property
    def lock(self) -> asyncio.Lock:
        """Serialises commits; made on first use, as most uploads never need it twice."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    def commit(self, content: Content, blocks: list[Block]) -> None:
        """Make `content` the blob and `blocks` its committed block list (Put Blob: none).

        Uncommitted blocks are dropped, as Azure does on commit; files that neither the new
        blob nor a linked file uses are deleted.
        """
        before = {b.path for b in (*self.committed_blocks, *self.uncommitted.values())}
        if self.content is not None:
            before.update(self.content.parts)
        self.content = content
        self.committed_blocks = blocks
        self.uncommitted = {}
        keep = self.linked | set(content.parts) | {b.path for b in blocks}
        for path in before - keep:
            path.unlink(missing_ok=True)

    def next_path(self, prefix: str) -> Path:
        """A fresh file name: a replaced block or blob never overwrites bytes still in use."""
        self._seq += 1
        return self.dir / f"{prefix}-{self._seq}"

    def to_json(self) -> dict[str, Any]:
        return {
            "upload_id": self.upload_id,
            "workspace": self.workspace,
            "created_on": self.created_on,
            "expires": self.expires,
            "committed": self.committed,
            "size": self.content.size if self.content is not None else None,
            "md5": self.content.md5.hex() if self.content is not None else None,
            "content_md5": self.content_md5,
            "content_type": self.content_type,
            "blob_puts": self.blob_puts,
            "committed_blocks": len(self.committed_blocks),
            "uncommitted_blocks": len(self.uncommitted),
        }


@dataclass
class Version:
    """One version of a stored file (awork's FileVersion); the file's first is version 1."""

    id: str
    number: int
    content: Content
    created_on: str
    created_by: str

    def info(self, file_id: str) -> dict[str, Any]:
        """awork's FileVersion (every property of the contract's schema, nothing else)."""
        return {
            "id": self.id,
            "fileInfoId": file_id,
            "version": self.number,
            "size": self.content.size,
            "width": None,
            "height": None,
            "createdOn": self.created_on,
            "createdBy": self.created_by,
            "updatedOn": self.created_on,
            "updatedBy": self.created_by,
        }


@dataclass
class StoredFile:
    id: str
    workspace: str
    entity: str  # awork path segment: tasks, projects, ...
    entity_id: str
    image: bool  # a profile image (files/images/...) rather than an entity file
    name: str
    file_name: str
    description: str | None
    content: Content
    mime_type: str
    upload_id: str | None
    created_on: str
    created_by: str
    content_md5: str | None = None
    version_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    versions: list[Version] = field(default_factory=list)
    updated_on: str = ""

    def __post_init__(self) -> None:
        if not self.versions:
            self.versions = [Version(self.version_id, 1, self.content, self.created_on, self.created_by)]
        self.updated_on = self.updated_on or self.created_on

    def add_version(self, content: Content, created_by: str) -> Version:
        """A new version: it becomes the file's content (downloads return the newest)."""
        version = Version(str(uuid.uuid4()), len(self.versions) + 1, content, now_iso(), created_by)
        self.versions.append(version)
        self.content = content
        self.content_md5 = None
        self.updated_on = version.created_on
        return version

    @property
    def size(self) -> int:
        return self.content.size

    @property
    def md5(self) -> bytes:
        return self.content.md5

    def to_stats(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "workspace": self.workspace,
            "entity": self.entity,
            "entity_id": self.entity_id,
            "image": self.image,
            "name": self.name,
            "file_name": self.file_name,
            "description": self.description,
            "size": self.size,
            "md5": self.md5.hex(),
            "content_md5": self.content_md5,
            "mime_type": self.mime_type,
            "upload_id": self.upload_id,
            "created_on": self.created_on,
            "versions": [
                {"id": v.id, "version": v.number, "size": v.content.size, "md5": v.content.md5.hex()}
                for v in self.versions
            ],
        }

    def file_info(self) -> dict[str, Any]:
        """awork's FileInfo (every property of the contract's schema, nothing else)."""
        info: dict[str, Any] = {
            "name": self.name,
            "description": self.description,
            "id": self.id,
            "entityId": self.entity_id,
        }
        owner = OWNER_FIELDS.get(self.entity)
        for f in ALL_OWNER_FIELDS:
            info[f] = self.entity_id if f == owner else None
        info.update(
            {
                "fileName": self.file_name,
                "entityType": ENTITY_TYPES[self.entity],
                "mimeType": self.mime_type,
                "createdOn": self.created_on,
                "createdBy": self.created_by,
                "updatedOn": self.updated_on,
                "updatedBy": self.created_by,
                "fileVersions": [v.info(self.id) for v in self.versions],
                "isCommentFile": False,
                "externalProvider": None,
                "externalFileUrl": None,
                "isHiddenForConnectUsers": False,
            }
        )
        return info


class Counters:
    """What tests read from GET /_sandbox/stats."""

    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()
        self.statuses: Counter[str] = Counter()
        self.statuses_by_route: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.api_requests = 0
        self.blob_requests = 0
        self.rate_limited = 0
        self.rate_limited_by_workspace: Counter[str] = Counter()
        self.requests_by_workspace: Counter[str] = Counter()
        self.unauthorized = 0
        self.links: Counter[str] = Counter()
        self.link_attempts: Counter[str] = Counter()
        self.blocks: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.faults_injected: Counter[str] = Counter()
        self.blob_authorization_headers = 0
        self.bytes_received = 0
        self.byurl_fetches = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": dict(self.requests),
            "api_requests": self.api_requests,
            "blob_requests": self.blob_requests,
            "statuses": dict(self.statuses),
            "statuses_by_route": {k: dict(v) for k, v in self.statuses_by_route.items()},
            "rate_limited": self.rate_limited,
            "rate_limited_by_workspace": dict(self.rate_limited_by_workspace),
            "requests_by_workspace": dict(self.requests_by_workspace),
            "unauthorized": self.unauthorized,
            "links": dict(self.links),
            "link_attempts": dict(self.link_attempts),
            "blocks": {k: dict(v) for k, v in self.blocks.items()},
            "faults_injected": {
                k: self.faults_injected.get(k, 0)
                for k in ("500", "503", "429", "drop", "drop_after", "500_after", "stall_after", "latency")
            },
            "blob_authorization_headers": self.blob_authorization_headers,
            "bytes_received": self.bytes_received,
            "byurl_fetches": self.byurl_fetches,
        }


class SandboxState:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.uploads_dir = data_dir / "uploads"
        self.files_dir = data_dir / "files"
        self.tmp_dir = data_dir / "tmp"
        # type -> id -> workspace it belongs to (None: visible to every workspace)
        self.entities: dict[str, dict[str, str | None]] = {t: {} for t in ENTITY_TYPES}
        self.uploads: dict[str, Upload] = {}
        self.files: dict[str, StoredFile] = {}
        self.files_by_entity: defaultdict[tuple[str, str], list[str]] = defaultdict(list)
        self.images: dict[tuple[str, str], str] = {}  # (entityName, id) -> current image file
        self.counters = Counters()
        self._make_dirs()

    def _make_dirs(self) -> None:
        for d in (self.uploads_dir, self.files_dir, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)

    def reset(self, entities: bool) -> None:
        """Forget uploads, files and counters (and entities if asked); delete their bytes."""
        self.uploads.clear()
        self.files.clear()
        self.files_by_entity.clear()
        self.images.clear()
        self.counters = Counters()
        if entities:
            for ids in self.entities.values():
                ids.clear()
        for d in (self.uploads_dir, self.files_dir, self.tmp_dir):
            shutil.rmtree(d, ignore_errors=True)
        self._make_dirs()

    def entity_visible(self, entity: str, entity_id: str, workspace: str) -> bool:
        ids = self.entities.get(entity)
        if ids is None or entity_id not in ids:
            return False
        owner = ids[entity_id]
        return owner is None or owner == workspace

    def new_upload(self, upload_id: str, workspace: str, expires: str) -> Upload:
        d = self.uploads_dir / upload_id  # created by the first blob write
        up = Upload(upload_id, workspace, _iso_seconds(), expires, d)
        self.uploads[upload_id] = up
        return up

    def add_file(self, f: StoredFile) -> None:
        self.files[f.id] = f
        if f.image:
            self.images[(f.entity, f.entity_id)] = f.id
        else:
            self.files_by_entity[(f.entity, f.entity_id)].append(f.id)

    def new_file_path(self, file_id: str) -> Path:
        return self.files_dir / file_id

    def tmp_path(self) -> Path:
        return self.tmp_dir / uuid.uuid4().hex

    def entities_json(self) -> dict[str, list[dict[str, str | None]]]:
        return {
            t: [{"id": i, "workspace": ws} for i, ws in ids.items()]
            for t, ids in self.entities.items()
        }
