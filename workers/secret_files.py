"""Secrets read from files and `NAME` / `NAME_FILE` variables: one reader for keys, tokens and
client secrets.

A secret file is opened once and checked on what was opened (fstat), so a file swapped between a
check and the read cannot slip through; it must be a regular file, and one that group or others
may read is refused (chmod 600), since a key readable by every local user is no secret.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path

from producers.config import ConfigError

MAX_SECRET_BYTES = 64 * 1024


def read_secret_file(field: str, path: Path, *, private: bool = True) -> str:
    """The stripped text of a secret file; ConfigError naming `field` when it is unusable."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ConfigError(f"{field}: {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"{field}: {path} cannot be read ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as handle:
        mode = os.fstat(handle.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise ConfigError(f"{field}: {path} is not a regular file")
        if private and mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(f"{field}: {path} is readable by others; chmod 600 it")
        data = handle.read(MAX_SECRET_BYTES + 1)
    if len(data) > MAX_SECRET_BYTES:
        raise ConfigError(f"{field}: {path} is larger than {MAX_SECRET_BYTES} bytes; not a secret")
    try:
        value = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ConfigError(f"{field}: {path} is not UTF-8 text") from None
    if not value:
        raise ConfigError(f"{field}: {path} is empty")
    return value


def secret_from_env(env: Mapping[str, str], name: str, *, private: bool = True) -> str:
    """`name` itself, or the file `name_FILE` points at; "" when neither is set."""
    raw = env.get(name, "").strip()
    file = env.get(f"{name}_FILE", "").strip()
    if raw and file:
        raise ConfigError(f"{name} and {name}_FILE: set one, not both")
    if file:
        return read_secret_file(f"{name}_FILE", Path(file), private=private)
    return raw


__all__ = ["read_secret_file", "secret_from_env"]
