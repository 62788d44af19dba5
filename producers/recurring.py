"""Recurring files: what a job does when the entity may already hold its file, and the route.

Three JobSpec fields, checked here (each error names its field):

- `on_existing`: `new` (the default: always a new file), `version` (a new version of the
  entity's newest file with the same name, else a new file), `skip` (nothing when a file with
  the same name and size is there: the job ends `done`, outcome `skipped`, with that file's id).
- `new_version_of`: a file id: a new version of that file, whatever its name.
- `via`: `workers` (the default: the bytes pass through the workers) or `awork` (awork fetches a
  public URL itself, at most 100 MB: producers.public_source).

The flow a job takes (its record's `flow`) and its first task:

- `""`: the default canvas (generate -> put -> link, or the multipart step);
- `resolve` (`awork.resolve_existing`, for version and skip): looks up the file list under a
  fleet-wide per-entity-and-name lock, then ends the job (skip), or continues as `version` or
  as the default or byurl flow;
- `version` (`awork.add_version`): one multipart POST to .../files/{fileId}/versions;
- `byurl` (`awork.fetch_by_url`): one POST to .../files/byurl.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from producers.contract import STEP_TASKS, Route, SpecError, Target
from producers.priority import DEFAULT_PRIORITY, Priority

if TYPE_CHECKING:
    from celery import Celery
    from celery.canvas import Signature

ON_EXISTING = ("new", "version", "skip")
VIA = ("workers", "awork")
# flow -> the step it starts with (its name in the record's attempts_* fields) and its task
FLOW_STEPS: dict[str, tuple[str, str]] = {f: (f, STEP_TASKS[f]) for f in ("resolve", "version", "byurl")}


@dataclass(frozen=True)
class Placement:
    on_existing: str = "new"
    new_version_of: str | None = None
    via: str = "workers"

    @property
    def flow(self) -> str:
        """The flow the job starts with (see the module docstring)."""
        if self.new_version_of:
            return "version"
        if self.on_existing != "new":
            return "resolve"
        return "byurl" if self.via == "awork" else ""

    def record_fields(self) -> dict[str, str]:
        return {
            "on_existing": self.on_existing,
            "new_version_of": self.new_version_of or "",
            "via": self.via,
            "flow": self.flow,
        }


def check_placement(
    on_existing: object, new_version_of: object, via: object, target: Target, is_url: bool
) -> Placement:
    """The three fields, checked against each other and the target."""
    if on_existing not in ON_EXISTING:
        raise SpecError("on_existing", f"expected one of {', '.join(ON_EXISTING)}, got {on_existing!r}")
    if via not in VIA:
        raise SpecError("via", f"expected one of {', '.join(VIA)}, got {via!r}")
    file_id: str | None = None
    if new_version_of is not None:
        try:
            file_id = str(uuid.UUID(str(new_version_of)))
        except ValueError:
            raise SpecError(
                "new_version_of", f"malformed file id {new_version_of!r}: awork ids are UUIDs"
            ) from None
        if on_existing != "new":
            raise SpecError("new_version_of", "names the file already: leave on_existing at 'new'")
    image = target.route is Route.IMAGE_BY_UPLOAD_ID
    if image and (on_existing != "new" or file_id or via != "workers"):
        field = "on_existing" if on_existing != "new" else "new_version_of" if file_id else "via"
        raise SpecError(field, f"profile images ({target}) have no versions, file list or byurl route")
    if on_existing != "new" and target.list_path is None:
        raise SpecError(
            "on_existing",
            f"awork has no file list for {target.entity}, so existing files cannot be looked up",
        )
    if on_existing == "skip" and is_url and via == "workers":
        raise SpecError(
            "on_existing",
            "skip compares name and size, and a URL's size is known only when it goes via awork",
        )
    if via == "awork":
        if not is_url:
            raise SpecError("via", "awork fetches http(s) URLs only: give a URL source, or leave via unset")
        if file_id or on_existing == "version":
            field = "new_version_of" if file_id else "on_existing"
            raise SpecError(
                field, "awork adds versions from uploaded bytes only: leave via unset for versions"
            )
    return Placement(str(on_existing), file_id, str(via))


def first_step(record: dict[str, str]) -> str | None:
    """For a re-drive: the step of the job's recurring flow, or None for the default canvas."""
    found = FLOW_STEPS.get(record.get("flow") or "")
    return found[0] if found else None


def flow_canvas(
    app: Celery, flow: str, kwargs: dict[str, Any], priority: Priority = DEFAULT_PRIORITY
) -> Signature | None:
    """The one task a recurring flow starts with, or None (the default canvas)."""
    from producers.canvas import step

    found = FLOW_STEPS.get(flow)
    return step(app, found[1], kwargs, priority) if found else None
