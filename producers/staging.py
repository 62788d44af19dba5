"""Getting the bytes where every worker can read them: the shared staging directory.

Messages never carry bytes. A file already under STAGING_DIR is referenced in place (and left
alone afterwards); a file elsewhere, or raw bytes, is copied in first under a folder named after
the job, which the workers remove once the job has ended. A copied file large enough to go up as
blocks gets its block MD5s beside that folder (producers.block_digests); raw bytes and files
referenced in place do not, and their workers hash the blocks themselves.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from producers.block_digests import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_SINGLE_PUT_THRESHOLD,
    BlockDigests,
    BlockHasher,
    block_size_for,
    sidecar_path,
)
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


def stage_file(
    path: Path,
    staging_dir: Path,
    job_id: str,
    file_name: str,
    single_put_threshold: int = DEFAULT_SINGLE_PUT_THRESHOLD,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> Staged:
    """Copy `path` into the job's folder, hashing it on the way (and its blocks, when it is
    large enough to go up as blocks: see producers.block_digests)."""
    staging_dir.mkdir(parents=True, exist_ok=True)
    if inside(path, staging_dir):
        return Staged(path.resolve(), False, None)
    dest_dir = job_dir(staging_dir, job_id)
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / _safe_name(file_name)
    digest = hashlib.md5(usedforsecurity=False)
    size = path.stat().st_size
    blocks = BlockHasher(block_size_for(size, block_size)) if size > single_put_threshold else None
    copied = 0
    try:
        with path.open("rb") as src, dest.open("wb") as out:
            while chunk := src.read(COPY_CHUNK):
                if blocks is not None:
                    blocks.update(chunk)
                digest.update(chunk)
                out.write(chunk)
                copied += len(chunk)
        md5 = base64.b64encode(digest.digest()).decode()
        # a file that changed size while it was copied gets no digests: the worker hashes it
        if blocks is not None and copied == size:
            sidecar = BlockDigests(size, blocks.block_size, md5, blocks.finish())
            sidecar_path(staging_dir, job_id).write_text(sidecar.dump(), encoding="ascii")
    except BaseException:
        remove_job_dir(staging_dir, job_id)
        raise
    finally:
        if blocks is not None:
            blocks.close()
    return Staged(dest, True, md5)


def stage_bytes(data: bytes, staging_dir: Path, job_id: str, file_name: str) -> Staged:
    dest_dir = job_dir(staging_dir, job_id)
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / _safe_name(file_name)
    dest.write_bytes(data)
    md5 = base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()
    return Staged(dest, True, md5)


def remove_job_dir(staging_dir: Path, job_id: str) -> None:
    shutil.rmtree(job_dir(staging_dir, job_id), ignore_errors=True)
    sidecar_path(staging_dir, job_id).unlink(missing_ok=True)


def _safe_name(file_name: str) -> str:
    # The awork file name may contain anything; on disk we need a plain base name.
    name = Path(file_name).name.replace(os.sep, "_")
    return name if name not in ("", ".", "..") else "file"
