"""Getting the bytes where every worker can read them: the shared staging directory.

Messages never carry bytes. A file already under STAGING_DIR is referenced in place (and left
alone afterwards); a file elsewhere, or raw bytes, is copied in first under a folder named after
the job, which the workers remove once the job has ended. A copied file large enough to go up as
blocks gets its block MD5s beside that folder (producers.block_digests); raw bytes and files
referenced in place do not, and their workers hash the blocks themselves.

A source file is opened once (producers.safe_open): symlinks as the last component, FIFOs,
devices and sockets are refused, and the copy reads that descriptor up to the size `fstat` gave
at open. A file that grows while it is copied is copied up to that size (the job uploads the
file as it was when staging began); one that shrinks is refused. Staged copies are created
0600 in 0700 folders (or 0640/0770 with AWORK_STAGING_MODE=group, see producers.staging_mode)
whatever the umask.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
from collections.abc import Sequence
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
from producers.job_ids import check_job_id
from producers.safe_open import FileRefused, OpenedFile, open_regular, within
from producers.staging_mode import PRIVATE, StagingMode

COPY_CHUNK = 8 * 1024 * 1024
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def open_source_file(path: Path, field: str = "path") -> OpenedFile:
    """Open a producer's source file once (see producers.safe_open); SpecError names `field`."""
    try:
        opened = open_regular(path)
    except FileRefused as exc:
        raise SpecError(field, f"{path}: {exc.reason}") from None
    if opened.size == 0:
        opened.close()
        raise SpecError(field, f"{path}: is empty (awork does not take empty files)")
    return opened


def check_local_file(path: Path, field: str = "path", head: int = 0) -> tuple[int, bytes]:
    """Validate a local source file: its size and its first `head` bytes, from one descriptor."""
    with open_source_file(path, field) as opened:
        return opened.size, opened.pread(0, head) if head else b""


def job_dir(staging_dir: Path, job_id: str) -> Path:
    return staging_dir / check_job_id(job_id)


@dataclass(frozen=True)
class Staged:
    """Where the workers read the bytes, whether we own (and later delete) them, and their MD5
    (base64, as Content-MD5 wants) when we computed it while copying: the worker then skips a
    hashing pass and the upload host verifies the bytes against what the producer handed in.
    `size` is the size seen when staging opened the source."""

    path: Path
    owned: bool
    md5_b64: str | None
    size: int


def stage_file(
    path: Path,
    staging_dir: Path,
    job_id: str,
    file_name: str,
    single_put_threshold: int = DEFAULT_SINGLE_PUT_THRESHOLD,
    block_size: int = DEFAULT_BLOCK_SIZE,
    mode: StagingMode = PRIVATE,
) -> Staged:
    """Copy `path` into the job's folder, hashing it on the way (and its blocks, when it is
    large enough to go up as blocks: see producers.block_digests)."""
    _ensure_root(staging_dir, mode)
    with open_source_file(path) as src:
        located = src.located() or os.path.realpath(path)
        # referenced in place only as the workers will accept it: one link, no symlink on the way
        # (the kernel's name of the opened file has none); anything else is copied
        if within(located, os.path.realpath(staging_dir)) and os.fstat(src.fd).st_nlink == 1:
            return Staged(Path(located), False, None, src.size)
        return _copy(src, staging_dir, job_id, file_name, single_put_threshold, block_size, mode)


def _copy(
    src: OpenedFile,
    staging_dir: Path,
    job_id: str,
    file_name: str,
    single_put_threshold: int,
    block_size: int,
    mode: StagingMode,
) -> Staged:
    size = src.size
    digest = hashlib.md5(usedforsecurity=False)
    blocks = BlockHasher(block_size_for(size, block_size)) if size > single_put_threshold else None
    dest_dir = _make_job_dir(staging_dir, job_id, mode)
    dest = dest_dir / _safe_name(file_name)
    copied = 0
    try:
        out = _create(dest, mode)
        try:
            while copied < size:
                chunk = src.pread(copied, COPY_CHUNK)
                if not chunk:
                    raise SpecError("path", f"{file_name}: shrank from {size} to {copied} bytes while copied")
                if blocks is not None:
                    blocks.update(chunk)
                digest.update(chunk)
                write_all(out, [chunk])
                copied += len(chunk)
        finally:
            os.close(out)
        md5 = base64.b64encode(digest.digest()).decode()
        if blocks is not None:
            sidecar = BlockDigests(size, blocks.block_size, md5, blocks.finish())
            _write_new(sidecar_path(staging_dir, job_id), sidecar.dump().encode("ascii"), mode)
    except BaseException:
        remove_job_dir(staging_dir, job_id)
        raise
    finally:
        if blocks is not None:
            blocks.close()
    return Staged(dest, True, md5, size)


@dataclass(frozen=True)
class StreamedBody:
    """Bytes already written into a job's staging folder as they arrived (the HTTP intake's
    request body, producers.intake.body): the job gets this id, owns the folder and trusts this
    MD5, computed on the way in. `head`: the first bytes, for the image check."""

    job_id: str
    path: Path
    md5_b64: str
    size: int
    head: bytes


def create_job_file(
    staging_dir: Path, job_id: str, file_name: str, mode: StagingMode = PRIVATE
) -> tuple[Path, int]:
    """A new, empty staged file for the job (its folder made fresh): (path, open descriptor)."""
    _ensure_root(staging_dir, mode)
    dest = _make_job_dir(staging_dir, job_id, mode) / _safe_name(file_name)
    try:
        return dest, _create(dest, mode)
    except BaseException:
        remove_job_dir(staging_dir, job_id)
        raise


def stage_bytes(
    data: bytes, staging_dir: Path, job_id: str, file_name: str, mode: StagingMode = PRIVATE
) -> Staged:
    dest, fd = create_job_file(staging_dir, job_id, file_name, mode)
    try:
        write_all(fd, [data])
    except BaseException:
        remove_job_dir(staging_dir, job_id)
        raise
    finally:
        os.close(fd)
    md5 = base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()
    return Staged(dest, True, md5, len(data))


def remove_job_dir(staging_dir: Path, job_id: str) -> None:
    """Delete a job's staged folder and block MD5s, and nothing else: the id must be a job id
    (SpecError otherwise) and what is deleted must resolve to a direct child of STAGING_DIR."""
    folder = job_dir(staging_dir, job_id)
    root = os.path.realpath(staging_dir)
    if os.path.islink(folder):
        folder.unlink()  # a link planted under the job's name: remove the link, not its target
    elif os.path.dirname(os.path.realpath(folder)) == root:
        shutil.rmtree(folder, ignore_errors=True)
    # a direct child of STAGING_DIR (the id is checked); unlink never follows a symlink
    sidecar_path(staging_dir, job_id).unlink(missing_ok=True)


def _ensure_root(staging_dir: Path, mode: StagingMode) -> None:
    if not staging_dir.is_dir():
        staging_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(staging_dir, mode.dir_mode)


def _make_job_dir(staging_dir: Path, job_id: str, mode: StagingMode) -> Path:
    """A fresh folder for the job (an existing one, or a link in its place, is an error)."""
    folder = job_dir(staging_dir, job_id)
    os.mkdir(folder, mode.dir_mode)
    os.chmod(folder, mode.dir_mode, follow_symlinks=False)  # exact, whatever the umask
    return folder


def _create(path: Path, mode: StagingMode) -> int:
    fd = os.open(path, _CREATE_FLAGS, mode.file_mode)
    os.fchmod(fd, mode.file_mode)  # exact, whatever the umask
    return fd


def write_all(fd: int, chunks: Sequence[bytes]) -> None:
    """Write every chunk to a staged file: one writev per up to 1024 chunks (the HTTP intake
    hands over a buffer's worth of request chunks at a time), finishing partial writes."""
    pending = [memoryview(c) for c in chunks if c]
    while pending:
        written = os.writev(fd, pending[:1024])
        while written and pending:
            if written >= len(pending[0]):
                written -= len(pending[0])
                pending.pop(0)
            else:
                pending[0] = pending[0][written:]
                written = 0


def _write_new(path: Path, data: bytes, mode: StagingMode) -> None:
    fd = _create(path, mode)
    try:
        write_all(fd, [data])
    finally:
        os.close(fd)


def _safe_name(file_name: str) -> str:
    # The awork file name may contain anything; on disk we need a plain base name.
    name = Path(file_name).name.replace(os.sep, "_").replace("\0", "_")
    return name if name not in ("", ".", "..") else "file"
