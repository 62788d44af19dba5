"""Recognising our own file among an entity's files after a link whose answer was lost."""

from __future__ import annotations

from datetime import datetime
from typing import Any

# awork's clock and ours may differ a little; a file created this long before we sent is not ours.
CLOCK_SKEW_SECONDS = 120


def find_linked_file(files: list[dict[str, Any]], record: dict[str, str]) -> dict[str, Any] | None:
    """The newest file with our name and size created after we sent the link, if any."""
    name = record.get("file_name")
    size = int(record["size"]) if record.get("size") else None
    started = float(record.get("link_started_at") or 0) - CLOCK_SKEW_SECONDS
    best: tuple[float, dict[str, Any]] | None = None
    for info in files:
        if name not in (info.get("fileName"), info.get("name")):
            continue
        got = latest_size(info)
        if size is not None and got is not None and got != size:
            continue
        created = _timestamp(info.get("createdOn"))
        if created is not None and created < started:
            continue
        key = created or 0.0
        if best is None or key > best[0]:
            best = (key, info)
    return best[1] if best else None


def _timestamp(value: object) -> float | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def newest_named(files: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    """The entity's most recently updated file called `name` (awork's fileName or name)."""
    named = [f for f in files if name in (f.get("fileName"), f.get("name")) and f.get("id")]
    if not named:
        return None
    return max(named, key=lambda f: _timestamp(f.get("updatedOn")) or _timestamp(f.get("createdOn")) or 0.0)


def latest_size(info: dict[str, Any]) -> int | None:
    """The size of a FileInfo's newest version (the highest number; awork lists them oldest
    first, so on equal or missing numbers the last listed)."""
    versions = [v for v in info.get("fileVersions") or [] if isinstance(v, dict)]
    newest = max(reversed(versions), key=lambda v: float(v.get("version") or 0), default=None)
    return int(newest["size"]) if newest is not None and newest.get("size") is not None else None


def top_version(versions: list[Any]) -> int:
    """The highest version number among a file's versions (0 for none)."""
    return int(max((float(v.get("version") or 0) for v in versions if isinstance(v, dict)), default=0))
