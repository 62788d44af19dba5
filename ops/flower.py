"""`awork-uploads flower`: Flower for the fleet, with basic auth, and a launcher for the stack and tests.

- Auth: FLOWER_BASIC_AUTH (``user:password``, several separated by commas) or ``--basic-auth``.
  It reaches Flower through the environment (Flower reads FLOWER_BASIC_AUTH itself), never
  through its command line, so it does not show in ``ps``.
- Without auth Flower starts only on a loopback address; on any other address it refuses to
  start. (Flower's ``/metrics`` and ``/healthcheck`` are never behind auth; they hold no
  secrets.)
- Read-only by default: Flower's control API (shut down workers, revoke tasks, send any task...)
  answers 403 for every user (ops/flower_server.py). ``--allow-control`` or
  AWORK_FLOWER_CONTROL=1 is the operator's explicit opt-in to Flower's full API.
- ``--persistent-db PATH`` keeps Flower's task history across restarts (saved every 10 s and on
  exit).
- Settings shared by every Flower we start (columns, redaction of task fields, memory bounds)
  are in ops/flowerconfig.py.

``FlowerProcess`` starts Flower as a child process (the stack and the tests use it) and reads its
API: ``tasks()`` is ``GET /api/tasks``, ``wait_for_tasks(predicate)`` polls it.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ops.flower_server import ALLOW_CONTROL_FLAG
from ops.processes import Child
from ops.redis_server import free_port
from producers.config import ConfigError

AUTH_ENV = "FLOWER_BASIC_AUTH"
# Flower would open its API to anyone without auth when this is set: never passed on.
UNAUTHENTICATED_API_ENV = "FLOWER_UNAUTHENTICATED_API"
CONTROL_ENV = "AWORK_FLOWER_CONTROL"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")
FLOWERCONFIG = Path(__file__).with_name("flowerconfig.py")
DEFAULT_ADDRESS = "127.0.0.1"
DEFAULT_PORT = 5555
STATE_SAVE_INTERVAL_MS = 10_000


def is_loopback(address: str) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1; False for '' / 0.0.0.0 / :: (every interface)."""
    address = address.strip().strip("[]")
    if address.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def check_auth(auth: str | None, address: str) -> str | None:
    """The validated `user:password[,user:password]` value, or None (only allowed on loopback)."""
    auth = (auth or "").strip()
    if not auth:
        if not is_loopback(address):
            raise ConfigError(
                f"{AUTH_ENV}: not set; refusing to start Flower on {address or 'all interfaces'} without "
                f"auth (set {AUTH_ENV}=user:password, or --address 127.0.0.1)"
            )
        return None
    for credential in auth.split(","):
        user, sep, password = credential.partition(":")
        if not sep or not user.strip() or not password:
            raise ConfigError(f"{AUTH_ENV}: expected user:password (several separated by commas)")
    return auth


def control_allowed(flag: bool, env: Mapping[str, str]) -> bool:
    """The opt-in to Flower's control API: the flag, or AWORK_FLOWER_CONTROL set to a true value."""
    value = env.get(CONTROL_ENV, "").strip().lower()
    if value not in _TRUE + _FALSE:
        raise ConfigError(f"{CONTROL_ENV}: expected 1 or 0 (true/false, yes/no, on/off), got {value!r}")
    return flag or value in _TRUE


def flower_argv(
    address: str = DEFAULT_ADDRESS,
    port: int = DEFAULT_PORT,
    persistent_db: Path | None = None,
    conf: Path = FLOWERCONFIG,
    python: str = sys.executable,
    allow_control: bool = False,
) -> list[str]:
    """`celery -A workers flower ...` through ops.flower_server (read-only unless allowed): no
    secret in it."""
    control = [ALLOW_CONTROL_FLAG] if allow_control else []
    argv = [
        python, "-m", "ops.flower_server", *control, "-A", "workers", "flower",
        f"--conf={conf}", f"--address={address}", f"--port={port}",
    ]  # fmt: skip
    if persistent_db is not None:
        argv += [
            "--persistent=True",
            f"--db={persistent_db}",
            f"--state_save_interval={STATE_SAVE_INTERVAL_MS}",
        ]
    return argv


def flower_env(base: Mapping[str, str], auth: str | None) -> dict[str, str]:
    """The environment for Flower: FLOWER_BASIC_AUTH set (or removed), the unauthenticated API off."""
    env = dict(base)
    env.pop(UNAUTHENTICATED_API_ENV, None)
    if auth:
        env[AUTH_ENV] = auth
    else:
        env.pop(AUTH_ENV, None)
    return env


class FlowerProcess:
    """Flower as a child process, for the stack and the tests.

    >>> with FlowerProcess({"REDIS_URL": url}, basic_auth="admin:pw") as flower:
    ...     flower.wait_for_tasks(lambda tasks: len(tasks) >= 3)
    """

    def __init__(
        self,
        env: Mapping[str, str],
        *,
        address: str = DEFAULT_ADDRESS,
        port: int = 0,
        basic_auth: str | None = None,
        persistent_db: Path | None = None,
        log_path: Path | None = None,
        allow_control: bool | None = None,
    ) -> None:
        """`allow_control` None: as AWORK_FLOWER_CONTROL in `env` says (off when unset)."""
        auth = basic_auth if basic_auth is not None else env.get(AUTH_ENV)
        self.auth = check_auth(auth, address)
        self.allow_control = control_allowed(False, env) if allow_control is None else allow_control
        self.address = address
        self.port = port or free_port()
        self.persistent_db = persistent_db
        self.log_path = log_path
        self.child = Child(
            "flower",
            flower_argv(address, self.port, persistent_db, allow_control=self.allow_control),
            flower_env(env, self.auth),
            log_path,
        )

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.address in ("", "0.0.0.0", "::") else self.address
        return f"http://{host}:{self.port}"

    @property
    def credentials(self) -> tuple[str, str] | None:
        """The first user:password pair, for requests' `auth=`."""
        if not self.auth:
            return None
        user, _, password = self.auth.split(",")[0].partition(":")
        return user, password

    def launch(self) -> Child:
        """Start without waiting (the stack waits for its workers instead)."""
        return self.child.start()

    def start(self, timeout: float = 30.0) -> FlowerProcess:
        self.launch()
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until /healthcheck answers (it needs no auth)."""
        import requests

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.child.alive():
                raise RuntimeError(f"flower exited; see {self.log_path or 'its output'}")
            try:
                if requests.get(f"{self.url}/healthcheck", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"flower not answering on {self.url} after {timeout:.0f}s")

    def get(self, path: str, *, authenticated: bool = True, **params: Any) -> Any:
        """GET `path` (a requests.Response), with the credentials unless `authenticated=False`."""
        import requests

        auth = self.credentials if authenticated else None
        return requests.get(f"{self.url}{path}", params=params or None, auth=auth, timeout=10)

    def post(self, path: str, **data: Any) -> Any:
        """POST `path` with the credentials (a requests.Response); `data` as a form body."""
        import requests

        return requests.post(f"{self.url}{path}", data=data or None, auth=self.credentials, timeout=15)

    def tasks(self, **params: Any) -> dict[str, Any]:
        """GET /api/tasks: task id -> task (name, state, args, kwargs, ...)."""
        response = self.get("/api/tasks", **params)
        response.raise_for_status()
        data: dict[str, Any] = response.json()
        return data

    def wait_for_tasks(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 30.0, **params: Any
    ) -> dict[str, Any]:
        """Poll /api/tasks until `predicate(tasks)` holds; return those tasks (or raise)."""
        deadline = time.monotonic() + timeout
        tasks: dict[str, Any] = {}
        while time.monotonic() < deadline:
            tasks = self.tasks(**params)
            if predicate(tasks):
                return tasks
            time.sleep(0.3)
        raise TimeoutError(f"flower: condition not met after {timeout:.0f}s; {len(tasks)} tasks seen")

    def stop(self, grace: float = 10.0) -> None:
        self.child.stop(grace)

    def __enter__(self) -> FlowerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="awork-uploads flower",
        description="Run Flower for the fleet (celery -A workers flower): basic auth, read-only by default.",
        epilog=f"Auth comes from {AUTH_ENV}=user:password (preferred: it stays out of `ps`). "
        "Without it Flower starts only on a loopback address.",
    )
    p.add_argument("--address", default=DEFAULT_ADDRESS, help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default 5555)")
    p.add_argument(
        "--persistent-db", type=Path, default=None, metavar="PATH",
        help="keep task history in this file across restarts",
    )  # fmt: skip
    p.add_argument(
        "--basic-auth", default=None, metavar="USER:PASSWORD",
        help=f"instead of {AUTH_ENV} (which is preferred)",
    )  # fmt: skip
    p.add_argument(
        "--allow-control", action="store_true",
        help=f"serve Flower's control API (shut down workers, revoke and send tasks); off by "
        f"default, also {CONTROL_ENV}=1",
    )  # fmt: skip
    return p


def main(argv: Sequence[str]) -> int:
    """Validate, then become Flower (exec): signals reach it directly, the auth stays in its env."""
    args = build_parser().parse_args(list(argv))
    given = args.basic_auth if args.basic_auth is not None else os.environ.get(AUTH_ENV)
    auth = check_auth(given, args.address)
    allow_control = control_allowed(args.allow_control, os.environ)
    if auth is None:
        print(
            f"awork-uploads flower: {AUTH_ENV} not set: the web UI is open to local users and the API is off",
            file=sys.stderr,
        )
    if args.persistent_db is not None:
        args.persistent_db.parent.mkdir(parents=True, exist_ok=True)
    if allow_control:
        print(
            "awork-uploads flower: control is ON: every Flower user can shut down workers and send tasks",
            file=sys.stderr,
        )
    argv_ = flower_argv(args.address, args.port, args.persistent_db, allow_control=allow_control)
    os.execve(sys.executable, argv_, flower_env(os.environ, auth))
    return 0  # not reached
