"""Opening a source file once, and reading only from that descriptor.

Checking a path and then opening it again by path is a race: between the two, the file can be
swapped for a symlink to a key file, a FIFO that blocks the reader, or a file that keeps
growing. So a file is opened ONCE (`O_NOFOLLOW`: a symlink as the last component is refused;
`O_NONBLOCK`: opening a FIFO cannot hang), `fstat` on that descriptor must say "regular file",
its size is taken from that same `fstat`, and every later read is an `os.pread` on it (positional,
so parallel blocks can share one descriptor). A file that grows meanwhile is read only up to the
size seen at open; one that shrinks is an error for the reader to report.

Confinement to STAGING_DIR (`open_beneath`) is checked on what is opened, not on a path: the
relative path is walked one component at a time, each opened relative to its parent's
descriptor with `O_NOFOLLOW` (a hand-made `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`), so
no symlink and no `..` can lead out whatever is renamed or swapped during the walk; on Linux the
kernel's name of the opened descriptor (`/proc/self/fd/N`) is checked against the root as well,
which also catches a folder moved out of the root mid-walk. Hard links are the one thing a path
walk cannot see: a file with more than one link is refused beneath the root (staged copies have
exactly one), and the kernel's `fs.protected_hardlinks` (on by default) stops anyone from linking
a file they could not read themselves.
"""

from __future__ import annotations

import errno
import os
import stat
import weakref
from pathlib import Path

READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
DIR_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0)


class FileRefused(Exception):
    """The file cannot be used as a source; `reason` says why (no path inside), `missing` when
    it is simply not there."""

    def __init__(self, reason: str, missing: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.missing = missing


class OpenedFile:
    """A regular file opened once; `size` is what `fstat` said at open. Thread-safe reads."""

    def __init__(self, fd: int, size: int, name: str) -> None:
        self.fd = fd
        self.size = size
        self.name = name
        self._closer = weakref.finalize(self, os.close, fd)

    def pread(self, offset: int, length: int) -> bytes:
        """Up to `length` bytes at `offset`, never past the size seen at open; fewer only at EOF."""
        length = max(0, min(length, self.size - offset))
        parts: list[bytes] = []
        while length > 0:
            chunk = os.pread(self.fd, length, offset)
            if not chunk:
                break
            parts.append(chunk)
            offset += len(chunk)
            length -= len(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def located(self) -> str | None:
        """Where the kernel says this descriptor's file is (Linux), else None."""
        try:
            return os.readlink(f"/proc/self/fd/{self.fd}")
        except OSError:
            return None

    @property
    def closed(self) -> bool:
        return not self._closer.alive

    def close(self) -> None:
        self._closer()

    def __enter__(self) -> OpenedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _refusal(exc: OSError) -> FileRefused:
    if exc.errno == errno.ENOENT:
        return FileRefused("no such file", missing=True)
    if exc.errno == errno.ELOOP:
        return FileRefused("is a symbolic link (name the file itself)")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return FileRefused("not readable")
    if exc.errno == errno.ENXIO:
        return FileRefused("is a socket or a device, not a regular file")
    if exc.errno == errno.ENOTDIR:
        return FileRefused("a folder on the way is not a folder (or is a symbolic link)")
    return FileRefused(exc.strerror or type(exc).__name__)


def _checked(fd: int, name: str) -> OpenedFile:
    """Wrap `fd` when fstat says it is a regular file; close it and refuse otherwise."""
    try:
        st = os.fstat(fd)
        mode = st.st_mode
        if not stat.S_ISREG(mode):
            if stat.S_ISDIR(mode):
                raise FileRefused("is a directory, not a file")
            if stat.S_ISFIFO(mode):
                raise FileRefused("is a FIFO (named pipe), not a regular file")
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
                raise FileRefused("is a device, not a regular file")
            if stat.S_ISSOCK(mode):
                raise FileRefused("is a socket, not a regular file")
            raise FileRefused("not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return OpenedFile(fd, st.st_size, name)


def open_regular(path: str | os.PathLike[str]) -> OpenedFile:
    """Open a regular file once, refusing a symlink as last component, FIFOs, devices, sockets."""
    try:
        fd = os.open(path, READ_FLAGS)
    except OSError as exc:
        raise _refusal(exc) from None
    return _checked(fd, Path(path).name)


def within(located: str, root: str) -> bool:
    """`located` is strictly below `root` (both absolute, already resolved)."""
    return located != root and os.path.commonpath([located, root]) == root


def open_beneath(root: str | os.PathLike[str], path: str | os.PathLike[str]) -> OpenedFile:
    """Open `path`, which must lie strictly inside `root`, without following any symlink below
    `root` (see the module docstring for why this is sound)."""
    root_real = os.path.realpath(root)
    target = os.path.abspath(path)  # lexical: `..` is folded here and then must not lead out
    rel = None
    for base in (root_real, os.path.abspath(root)):
        if within(target, base):
            rel = os.path.relpath(target, base)
            break
    if rel is None:
        raise FileRefused("is not inside STAGING_DIR")
    parts = rel.split(os.sep)
    if any(p in ("", ".", "..") for p in parts):
        raise FileRefused("is not inside STAGING_DIR")
    try:
        dir_fd = os.open(root_real, DIR_FLAGS)
    except OSError as exc:
        raise FileRefused(f"STAGING_DIR cannot be opened ({exc.strerror})") from None
    try:
        for part in parts[:-1]:
            try:
                next_fd = os.open(part, DIR_FLAGS, dir_fd=dir_fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise FileRefused("reaches through a symbolic link inside STAGING_DIR") from None
                raise _refusal(exc) from None
            os.close(dir_fd)
            dir_fd = next_fd
        try:
            fd = os.open(parts[-1], READ_FLAGS, dir_fd=dir_fd)
        except OSError as exc:
            raise _refusal(exc) from None
    finally:
        os.close(dir_fd)
    opened = _checked(fd, parts[-1])
    try:
        if os.fstat(fd).st_nlink > 1:
            raise FileRefused("has more than one hard link: refused inside STAGING_DIR")
        located = opened.located()
        if located is not None and not within(located, root_real):
            raise FileRefused("is not inside STAGING_DIR (moved while it was opened)")
    except BaseException:
        opened.close()
        raise
    return opened
