"""A private RabbitMQ vhost for a test, a soak or a bench run, removed afterwards.

Runs, tests and benches share the machine's RabbitMQ; each gets its own vhost (its own queues,
exchanges and delayed-delivery queues), so nothing leaks from one run into the next and deleting
the vhost removes everything. Needs `rabbitmqctl` (run as a user that may talk to the node).

    python -m ops.rabbitmq create             # prints BROKER_URL=amqp://.../awork-<random>
    python -m ops.rabbitmq delete awork-<random>
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5672
DEFAULT_USER = "guest"
RABBITMQCTL_TIMEOUT_SECONDS = 60.0


class RabbitUnavailable(RuntimeError):
    """No RabbitMQ to use here (not listening, or no rabbitmqctl)."""


def reachable(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _ctl(*args: str) -> str:
    exe = shutil.which("rabbitmqctl")
    if exe is None:
        raise RabbitUnavailable("rabbitmqctl not found")
    proc = subprocess.run(
        [exe, *args], capture_output=True, text=True, timeout=RABBITMQCTL_TIMEOUT_SECONDS, check=False
    )
    if proc.returncode != 0:
        raise RabbitUnavailable(f"rabbitmqctl {' '.join(args)}: {proc.stderr.strip()[-500:]}")
    return proc.stdout


@dataclass
class Vhost:
    """A vhost with full permissions for `user`; `url` is the BROKER_URL for it."""

    name: str = ""
    user: str = DEFAULT_USER
    password: str = "guest"
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT

    def __post_init__(self) -> None:
        if not self.name:
            self.name = f"awork-{uuid.uuid4().hex[:10]}"

    @property
    def url(self) -> str:
        return f"amqp://{self.user}:{self.password}@{self.host}:{self.port}/{self.name}"

    def create(self) -> Vhost:
        if not reachable(self.host, self.port):
            raise RabbitUnavailable(f"nothing listens on {self.host}:{self.port}")
        _ctl("add_vhost", self.name)
        _ctl("set_permissions", "-p", self.name, self.user, ".*", ".*", ".*")
        return self

    def delete(self) -> None:
        _ctl("delete_vhost", self.name)

    def __enter__(self) -> Vhost:
        return self.create()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.delete()


def ready_in(url: str, queue: str) -> int:
    """Messages ready in `queue` now (a passive declare; 0 when there is no such queue). Unlike
    rabbitmqctl's counts, which quorum queues report from periodically refreshed metrics."""
    from kombu import Connection

    from producers.transport import queue_ready

    with Connection(url) as conn:
        return queue_ready(conn, queue)


def message_stats(vhost: str) -> dict[str, int]:
    """Queue name -> messages in it (ready + unacknowledged), by rabbitmqctl: every queue of the
    vhost, but as of the broker's last metrics refresh (seconds old)."""
    out = _ctl("list_queues", "-p", vhost, "--quiet", "--no-table-headers", "name", "messages")
    stats: dict[str, int] = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            stats[parts[0]] = int(parts[1])
    return stats


def close_connections(vhost: str, reason: str = "closed by a test") -> int:
    """Close every client connection to `vhost` from the broker's side (CONNECTION_FORCED, as a
    broker shutting down does); how many it closed."""
    out = _ctl("list_connections", "--quiet", "--no-table-headers", "pid", "vhost")
    closed = 0
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1] == vhost:
            _ctl("close_connection", parts[0], reason)
            closed += 1
    return closed


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["create"]:
        vhost = Vhost(password=os.environ.get("RABBITMQ_PASSWORD", "guest")).create()
        print(f"BROKER_URL={vhost.url}")
        return 0
    if args[:1] == ["delete"] and len(args) == 2:
        _ctl("delete_vhost", args[1])
        return 0
    print("usage: python -m ops.rabbitmq create | delete VHOST", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
