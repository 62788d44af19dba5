"""The job contract shared by producers and workers: task names, queues, states, targets.

Task names and queue names are stable strings so that any Celery client, in any language,
can publish the canvas; workers import these constants, never the other way round.
"""

from __future__ import annotations

import functools
import re
import uuid
from dataclasses import dataclass
from enum import StrEnum

TASK_GENERATE_UPLOAD_URL = "awork.generate_upload_url"
TASK_PUT_FILE = "awork.put_file"
TASK_LINK_FILE = "awork.link_file"
TASK_MULTIPART_UPLOAD = "awork.multipart_upload"
# Recurring files (producers.recurring): look up an existing file, add a version, fetch by URL.
TASK_RESOLVE_EXISTING = "awork.resolve_existing"
TASK_ADD_VERSION = "awork.add_version"
TASK_FETCH_BY_URL = "awork.fetch_by_url"

QUEUE_API = "awork.api"
QUEUE_TRANSFER = "awork.transfer"
# Completion callbacks (workers.callbacks): a queue of its own, so that delivering (and retrying
# for up to a day) never stands in front of an upload step.
QUEUE_CALLBACKS = "awork.callbacks"
TASK_DELIVER_CALLBACK = "awork.deliver_callback"

TASK_QUEUES: dict[str, str] = {
    TASK_GENERATE_UPLOAD_URL: QUEUE_API,
    TASK_PUT_FILE: QUEUE_TRANSFER,
    TASK_LINK_FILE: QUEUE_API,
    # One request that carries the bytes: bandwidth-bound, but it also spends a rate token.
    TASK_MULTIPART_UPLOAD: QUEUE_TRANSFER,
    TASK_RESOLVE_EXISTING: QUEUE_API,
    TASK_ADD_VERSION: QUEUE_TRANSFER,  # carries the bytes, like the multipart step
    TASK_FETCH_BY_URL: QUEUE_API,  # awork fetches: no bytes through the workers
    TASK_DELIVER_CALLBACK: QUEUE_CALLBACKS,
}

# Every step a job can run, by the name its record uses (attempts_<step>, its step lock), and the
# task that runs it: the one list the records, re-drives, the runner and the sweeper share.
STEP_TASKS: dict[str, str] = {
    "generate": TASK_GENERATE_UPLOAD_URL,
    "put": TASK_PUT_FILE,
    "link": TASK_LINK_FILE,
    "multipart": TASK_MULTIPART_UPLOAD,
    "resolve": TASK_RESOLVE_EXISTING,
    "version": TASK_ADD_VERSION,
    "byurl": TASK_FETCH_BY_URL,
}
# Steps that call awork's API (a rate token, a usable connection): all but the PUT to the blob host.
API_STEPS = frozenset(STEP_TASKS) - {"put"}


class JobState(StrEnum):
    QUEUED = "queued"
    REQUESTING_URL = "requesting_url"
    UPLOADING = "uploading"
    LINKING = "linking"
    # The job's connection needs the customer to connect again (producers.connections): the job
    # waits, it does not fail, and goes on once the connection is active.
    WAITING_FOR_CONNECTION = "waiting_for_connection"
    DONE = "done"
    FAILED = "failed"  # a permanent error: retrying cannot help
    DEAD = "dead"  # transient errors until the retry budget ran out
    CANCELED = "canceled"  # its producer canceled it before it was linked (producers.cancel)

    @property
    def finished(self) -> bool:
        return self in FINISHED_STATES


FINISHED_STATES = frozenset({JobState.DONE, JobState.FAILED, JobState.DEAD, JobState.CANCELED})


class Route(StrEnum):
    """How a target receives its bytes."""

    BY_UPLOAD_ID = "byuploadid"  # three steps, linked with POST /{entity}/{id}/files/byuploadid
    IMAGE_BY_UPLOAD_ID = "image_byuploadid"  # three steps, POST /files/images/{name}/{id}/byuploadid
    MULTIPART = "multipart"  # one streamed POST /{entity}/{id}/files


# Target kind (as written by producers) -> awork's entity path segment.
THREE_STEP_KINDS: dict[str, str] = {
    "task": "tasks",
    "project": "projects",
    "document": "documents",
    "tasktemplate": "tasktemplates",
}
MULTIPART_KINDS: dict[str, str] = {
    "company": "companies",
    "user": "users",
    "workspace": "workspaces",
    "projecttemplate": "projecttemplates",
}
# Entities whose files awork cannot list (no GET /{entity}/{id}/files in its API).
NO_FILE_LIST = frozenset({"companies"})
IMAGE_ENTITY_NAMES = frozenset(
    {"companies", "contactpersons", "projects", "projecttemplates", "users", "workspaces"}
)
TARGET_KINDS = (*THREE_STEP_KINDS, "image", *MULTIPART_KINDS)

# awork documents 1 GB for the one-request multipart route.
MULTIPART_MAX_BYTES = 1_000_000_000
# Azure's single Put Blob cap (5000 MiB) times the block count is far above this; awork does
# not document a cap for the upload URL, so we stop at Azure's max blob size for block blobs
# with 4000 MiB blocks -- in practice the limit is the staging disk.
UPLOAD_URL_MAX_BYTES = 50_000 * 4000 * 1024 * 1024

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_CANONICAL_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_ENTITY_ID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


class SpecError(ValueError):
    """Bad input from a producer. `field` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class Target:
    """Where a file goes: `task:<uuid>`, `image:projects/<uuid>`, `company:<uuid>`, ..."""

    kind: str
    entity: str  # awork path segment: tasks, projects, ..., or the image entityName
    entity_id: str
    route: Route

    def __str__(self) -> str:
        if self.route is Route.IMAGE_BY_UPLOAD_ID:
            return f"image:{self.entity}/{self.entity_id}"
        return f"{self.kind}:{self.entity_id}"

    @property
    def link_path(self) -> str:
        """The API path (below the base URL) that links an upload id or takes the multipart body."""
        if self.route is Route.IMAGE_BY_UPLOAD_ID:
            return f"/files/images/{self.entity}/{self.entity_id}/byuploadid"
        if self.route is Route.BY_UPLOAD_ID:
            return f"/{self.entity}/{self.entity_id}/files/byuploadid"
        return f"/{self.entity}/{self.entity_id}/files"

    @property
    def list_path(self) -> str | None:
        """The API path that lists the entity's files, where awork has one (not for images, and
        not for companies: awork has no GET /companies/{id}/files)."""
        if self.route is Route.IMAGE_BY_UPLOAD_ID or self.entity in NO_FILE_LIST:
            return None
        return f"/{self.entity}/{self.entity_id}/files"

    @property
    def three_steps(self) -> bool:
        return self.route is not Route.MULTIPART

    @property
    def max_bytes(self) -> int:
        return MULTIPART_MAX_BYTES if self.route is Route.MULTIPART else UPLOAD_URL_MAX_BYTES

    @classmethod
    def parse(cls, text: str, field: str = "to") -> Target:
        if isinstance(text, str):
            return _parse_target(text, field)  # a batch names the same targets many times
        return cls._parse(text, field)

    @classmethod
    def _parse(cls, text: str, field: str) -> Target:
        if not isinstance(text, str) or ":" not in text:
            raise SpecError(field, f"expected KIND:ID (kinds: {', '.join(TARGET_KINDS)}), got {text!r}")
        if _CONTROL.search(text):
            raise SpecError(field, f"contains a control character: {text!r}")
        kind, _, rest = text.partition(":")
        kind = kind.strip().lower()
        rest = rest.strip()
        if kind == "image":
            name, sep, entity_id = rest.partition("/")
            name = name.lower()
            if not sep:
                raise SpecError(field, f"image targets are image:<entityName>/<id>, got {text!r}")
            if name not in IMAGE_ENTITY_NAMES:
                raise SpecError(
                    field,
                    f"unknown image entity {name!r} (one of {', '.join(sorted(IMAGE_ENTITY_NAMES))})",
                )
            return cls("image", name, _entity_id(entity_id, field), Route.IMAGE_BY_UPLOAD_ID)
        if kind in THREE_STEP_KINDS:
            return cls(kind, THREE_STEP_KINDS[kind], _entity_id(rest, field), Route.BY_UPLOAD_ID)
        if kind in MULTIPART_KINDS:
            return cls(kind, MULTIPART_KINDS[kind], _entity_id(rest, field), Route.MULTIPART)
        raise SpecError(field, f"unknown target kind {kind!r} (one of {', '.join(TARGET_KINDS)})")


@functools.lru_cache(maxsize=4096)
def _parse_target(text: str, field: str) -> Target:
    return Target._parse(text, field)


def _entity_id(text: str, field: str) -> str:
    if _CANONICAL_ID.fullmatch(text):
        return text  # already what str(uuid.UUID(text)) gives
    if not _ENTITY_ID.fullmatch(text):
        raise SpecError(field, f"malformed id {text!r}: awork ids are UUIDs")
    return str(uuid.UUID(text))
