"""Getting the bytes where every worker can read them: the shared staging directory.

Messages never carry bytes. A file already under STAGING_DIR is referenced in place (and left
alone afterwards); a file elsewhere, or raw bytes, is copied in first under a folder named after
the job, which the workers remove once the job has ended.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from producers.contract import SpecError

COPY_CHUNK = 8 * 1024 * 1024


def inside(path: Path, root: Path) -> bool:
    """True when `path`, with every symlink resolved, lies under `root` (no `..` escape)."""
    try:
        path.resolve(strict=True).relative_to(root.resolve())
    except (ValueError, FileNotFoundError):
        return False
    return True


def check_local_file(path: Path, field: str = "path") -> int:
    """Validate a local source file and return its size."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise SpecError(field, f"{path}: no such file") from None
    except PermissionError:
        raise SpecError(field, f"{path}: not readable") from None
    if path.is_dir():
        raise SpecError(field, f"{path}: is a directory, not a file")
    if not path.is_file():
        raise SpecError(field, f"{path}: not a regular file")
    if not os.access(path, os.R_OK):
        raise SpecError(field, f"{path}: not readable")
    if st.st_size == 0:
        raise SpecError(field, f"{path}: is empty (awork does not take empty files)")
    return st.st_size


def job_dir(staging_dir: Path, job_id: str) -> Path:
    return staging_dir / job_id


@dataclass(frozen=True)
class Staged:
    """Where the workers read the bytes, whether we own (and later delete) them, and their MD5
    (base64, as Content-MD5 wants) when we computed it while copying: the worker then skips a
    hashing pass and the upload host verifies the bytes against what the producer handed in."""

    path: Path
    owned: bool
    md5_b64: str | None


def stage_file(path: Path, staging_dir: Path, job_id: str, file_name: str) -> Staged:
    staging_dir.mkdir(parents=True, exist_ok=True)
    if inside(path, staging_dir):
        return Staged(path.resolve(), False, None)
    dest_dir = job_dir(staging_dir, job_id)
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / _safe_name(file_name)
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with path.open("rb") as src, dest.open("wb") as out:
            while chunk := src.read(COPY_CHUNK):
                digest.update(chunk)
                out.write(chunk)
    except BaseException:
        shutil.rmtree(dest_dir, ignore_errors=True)
        raise
    return Staged(dest, True, base64.b64encode(digest.digest()).decode())


def stage_bytes(data: bytes, staging_dir: Path, job_id: str, file_name: str) -> Staged:
    dest_dir = job_dir(staging_dir, job_id)
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / _safe_name(file_name)
    dest.write_bytes(data)
    md5 = base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()
    return Staged(dest, True, md5)


def remove_job_dir(staging_dir: Path, job_id: str) -> None:
    shutil.rmtree(job_dir(staging_dir, job_id), ignore_errors=True)


def _safe_name(file_name: str) -> str:
    # The awork file name may contain anything; on disk we need a plain base name.
    name = Path(file_name).name.replace(os.sep, "_")
    return name if name not in ("", ".", "..") else "file"
