"""Secret files (API keys, the secrets key, OAuth client secrets, imported refresh tokens): one
reader that opens once, refuses what is not a private regular file, and never blocks."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from producers.config import ConfigError
from workers.secret_files import read_secret_file, secret_from_env
from workers.settings import _key_from_table


def _within(seconds: float, fn: object) -> object:
    """Run fn in a thread; fail (instead of hanging the suite) when it does not return in time."""
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["value"] = fn()  # type: ignore[operator]
        except BaseException as exc:
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "reading the secret blocked"
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box.get("value")


def test_a_fifo_as_key_file_is_refused_at_once(tmp_path: Path) -> None:
    """A named pipe with mode 600 passed the old stat() check, then read_text() blocked the worker
    at start for as long as nobody wrote to it."""
    fifo = tmp_path / "key"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(ConfigError, match=r"acme\.api_key_file: .* is not a regular file"):
        _within(5, lambda: _key_from_table("acme", {"api_key_file": str(fifo)}))


def test_private_regular_files_only(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("  s3cret\n")
    key.chmod(0o600)
    assert read_secret_file("--api-key-file", key) == "s3cret"
    key.chmod(0o640)
    with pytest.raises(ConfigError, match=r"--api-key-file: .* is readable by others; chmod 600 it"):
        read_secret_file("--api-key-file", key)
    assert read_secret_file("CLIENT_ID_FILE", key, private=False) == "s3cret"
    with pytest.raises(ConfigError, match=r"F: .* does not exist"):
        read_secret_file("F", tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.write_text("\n")
    empty.chmod(0o600)
    with pytest.raises(ConfigError, match=r"F: .* is empty"):
        read_secret_file("F", empty)
    big = tmp_path / "big"
    big.write_bytes(b"x" * (64 * 1024 + 1))
    big.chmod(0o600)
    with pytest.raises(ConfigError, match="larger than"):
        read_secret_file("F", big)


def test_name_or_name_file(tmp_path: Path) -> None:
    key = tmp_path / "k"
    key.write_text("from-file")
    key.chmod(0o600)
    assert secret_from_env({"X": " direct "}, "X") == "direct"
    assert secret_from_env({"X_FILE": str(key)}, "X") == "from-file"
    assert secret_from_env({}, "X") == ""
    with pytest.raises(ConfigError, match="X and X_FILE: set one, not both"):
        secret_from_env({"X": "a", "X_FILE": str(key)}, "X")
