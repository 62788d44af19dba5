"""Start a private redis-server on a free loopback port: for the stack, the tests and the soak.

Never someone else's Redis: each instance has its own port, data directory and AOF file.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import redis


def command_calls(client: redis.Redis) -> Counter[str]:
    """Commands the server has run so far, by name (INFO commandstats: the commands Lua scripts
    run count too, and the INFO calls that read them)."""
    stats: dict[str, dict[str, int]] = client.info("commandstats")  # type: ignore[assignment]
    return Counter({k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()})


def new_password() -> str:
    """A random password for a private redis-server, in hex: the server reads a command-line
    argument that starts with "--" as the next option, so a token_urlsafe password did that one
    time in 4,096 ("FATAL CONFIG FILE ERROR ... 'requirepass' wrong number of arguments", seen
    once in CI)."""
    return secrets.token_hex(16)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_redis_server() -> str:
    """The venv's redis-server (from the `embedded` extra) first, then the one on PATH."""
    local = Path(sys.executable).parent / "redis-server"
    if local.exists():
        return str(local)
    found = shutil.which("redis-server")
    if not found:
        raise RuntimeError(
            "redis-server not found: install the `embedded` extra (pip install 'awork-uploads[embedded]') "
            "or set REDIS_URL"
        )
    return found


class RedisServer:
    """A redis-server child process with AOF on and noeviction, as the broker needs."""

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        password: str | None = None,
        appendonly: bool = True,
        appendfsync: str = "everysec",
    ) -> None:
        """`appendfsync`: "everysec" can lose up to ~2 s of acknowledged writes when the process is
        killed while a slow background fsync holds back the AOF write; "always" loses none
        (each event-loop round waits for its fsync)."""
        self.data_dir = Path(data_dir).resolve()
        self.port = port or free_port()
        self.password = password
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            find_redis_server(),
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dir",
            str(self.data_dir),
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            self.appendfsync,
            "--save",
            "",
            "--maxmemory-policy",
            "noeviction",
            "--protected-mode",
            "yes",
            "--logfile",
            str(self.data_dir / "redis.log"),
        ]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, start_new_session=True)
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"redis-server did not start on port {self.port}; see {self.data_dir / 'redis.log'}"
                    ) from None
                time.sleep(0.05)
            finally:
                client.close()
        return self

    def kill(self) -> None:
        """SIGKILL, as a crash would: what AOF has synced survives."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def restart(self, kill: bool = True) -> None:
        """Stop (SIGKILL by default) and start again on the same port and AOF file."""
        self.kill() if kill else self.stop()
        self.start()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = ["RedisServer", "find_redis_server", "free_port"]

if __name__ == "__main__":  # pragma: no cover - manual use
    server = RedisServer(Path(os.environ.get("DATA_DIR", "var/redis"))).start()
    print(server.url, flush=True)
