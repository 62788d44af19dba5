"""One-way sync of a folder to an awork entity: new files uploaded, changed ones as new versions.

What was last synced lives in Redis, one hash per (workspace, target, folder)
(producers.keys.sync_state_key): relative name -> JSON {size, md5, mtime_ns, file_id, job}.
Redis rather than a state file because it is already where every job and its outcome live (a
sync run reads its jobs' results from there), it is shared by every host that may run the sync
(one state, not one per machine), each file's entry is written atomically, and nothing is
written into the folder being synced (which may be read-only, and would otherwise sync its own
state file).

A run: scan the folder (regular, non-hidden files at its top level; symlinks are not followed),
plan each file against the state (`upload`: never synced; `version`: size or MD5 differs from
what was last synced, sent as a new version of the synced file; `unchanged`; `pending`: an
earlier run's job is still running), enqueue the plan, wait for the jobs and record what each
one synced. A file whose size and mtime equal the state's is taken as unchanged without reading
it; otherwise its MD5 decides. A failed job leaves the previous state, so the next run tries
again. First uploads use on_existing=version where the entity has a file list, so a lost state
adds versions instead of duplicate files. Files deleted locally stay in awork (`--delete-missing
no` is the only mode).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from producers.contract import JobState, SpecError, Target
from producers.keys import sync_state_key
from producers.records import Job
from producers.spec import JobSpec

READ_CHUNK = 1 << 20


@dataclass(frozen=True)
class LocalFile:
    name: str
    path: Path
    size: int
    mtime_ns: int


@dataclass
class Planned:
    name: str
    action: str  # upload | version | unchanged | pending
    path: Path
    size: int
    md5: str = ""
    mtime_ns: int = 0
    file_id: str | None = None


@dataclass
class SyncResult:
    planned: list[Planned] = field(default_factory=list)
    jobs: list[Job] = field(default_factory=list)

    def count(self, action: str) -> int:
        return sum(1 for p in self.planned if p.action == action)

    @property
    def failed(self) -> list[Job]:
        return [j for j in self.jobs if j.state is not JobState.DONE]

    def summary(self) -> dict[str, Any]:
        return {
            "uploaded": self.count("upload"),
            "versions": self.count("version"),
            "unchanged": self.count("unchanged"),
            "pending": self.count("pending"),
            "failed": len(self.failed),
        }


def scan(folder: Path) -> list[LocalFile]:
    """Regular, non-hidden files at the folder's top level, by name (symlinks not followed)."""
    out = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISREG(st.st_mode) and st.st_size > 0:
                out.append(LocalFile(entry.name, Path(entry.path), st.st_size, st.st_mtime_ns))
    return sorted(out, key=lambda f: f.name)


def file_md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        while chunk := fh.read(READ_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class FolderSync:
    """Syncs `folder` to `to` through `uploads` (a producers.client.Uploads)."""

    def __init__(
        self,
        uploads: Any,
        folder: Path,
        to: str,
        workspace: str = "default",
        timeout: float | None = None,
        say: Callable[[str], None] = print,
    ) -> None:
        self.up = uploads
        if not folder.is_dir():
            raise SpecError("folder", f"{folder} is not a directory")
        self.folder = folder.resolve()
        self.target = Target.parse(to)
        if self.target.kind == "image":
            raise SpecError("to", "a folder syncs to an entity's files, not to a profile image")
        self.workspace = workspace
        self.timeout = timeout
        self.say = say
        self.key = sync_state_key(workspace, str(self.target), str(self.folder))

    # -- state -------------------------------------------------------------------------------
    def state(self) -> dict[str, dict[str, Any]]:
        raw = self.up.redis.hgetall(self.key)
        out = {}
        for k, v in raw.items():
            name = k.decode() if isinstance(k, bytes) else k
            try:
                out[name] = json.loads(v)
            except ValueError:
                continue  # a damaged entry: the file is planned as never synced
        return out

    def _save(self, name: str, entry: dict[str, Any]) -> None:
        self.up.redis.hset(self.key, name, json.dumps(entry))

    # -- plan --------------------------------------------------------------------------------
    def plan(self) -> list[Planned]:
        state = self.state()
        planned = []
        for f in scan(self.folder):
            entry = self._settle(f.name, state.get(f.name))
            if entry.get("job"):
                planned.append(Planned(f.name, "pending", f.path, f.size, file_id=entry.get("file_id")))
                continue
            file_id = entry.get("file_id")
            same_stat = entry.get("size") == f.size and entry.get("mtime_ns") == f.mtime_ns
            md5 = entry["md5"] if same_stat and file_id else file_md5(f.path)
            if not file_id:
                action = "upload"
            elif entry.get("size") == f.size and entry.get("md5") == md5:
                action = "unchanged"
            else:
                action = "version"
            planned.append(Planned(f.name, action, f.path, f.size, md5, f.mtime_ns, file_id))
        return planned

    def _settle(
        self, name: str, entry: dict[str, Any] | None, known: dict[str, Job] | None = None
    ) -> dict[str, Any]:
        """An entry whose job (from an earlier run) has ended since: its outcome recorded.

        `known`: jobs already read (this run's, from wait_many), so they are not read again."""
        if not entry or not entry.get("job"):
            return entry or {}
        job = (known or {}).get(entry["job"])
        if job is None:
            try:
                job = self.up.status(entry["job"])
            except KeyError:  # the record expired: that job's outcome is unknown, plan afresh
                job = None
        if job is not None and not job.finished:
            return entry
        settled = dict(entry.get("synced") or {})
        if job is not None and job.state is JobState.DONE and job.file_id:
            settled = {k: entry[k] for k in ("size", "md5", "mtime_ns")} | {"file_id": job.file_id}
        self._save(name, settled)
        return settled

    # -- run ---------------------------------------------------------------------------------
    def run(self, dry_run: bool = False) -> SyncResult:
        planned = self.plan()
        result = SyncResult(planned)
        for p in planned:
            if p.action != "unchanged" or dry_run:
                extra = f" (file {p.file_id})" if p.action in ("version", "pending") else ""
                self.say(f"{p.action:<9} {p.name}{extra}")
        todo = [p for p in planned if p.action in ("upload", "version")]
        if dry_run or not todo:
            return result
        lookup = self.target.list_path is not None
        specs = [
            JobSpec(
                p.path,
                str(self.target),
                self.workspace,
                name=p.name,
                on_existing="version" if p.action == "upload" and lookup else "new",
                new_version_of=p.file_id if p.action == "version" else None,
            )
            for p in todo
        ]
        state = self.state()
        jobs = self.up.enqueue_many(specs)
        for p, job in zip(todo, jobs, strict=True):
            previous = {k: v for k, v in (state.get(p.name) or {}).items() if k != "job"}
            self._save(p.name, {"size": p.size, "md5": p.md5, "mtime_ns": p.mtime_ns,
                                "file_id": p.file_id, "job": job.id, "synced": previous})
        result.jobs = self.up.wait_many([j.id for j in jobs], timeout=self.timeout)
        ended = {j.id: j for j in result.jobs}
        state = self.state()  # once, not once per file: the hash holds every file of the folder
        for p in todo:
            self._settle(p.name, state.get(p.name), ended)
        for job in result.failed:
            err = job.error
            self.say(f"failed    {job.file_name}: {err.code if err else ''} {err.description if err else ''}")
        return result
