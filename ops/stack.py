"""`awork-uploads stack`: Redis, the sandbox, N workers and Flower on one machine.

- Redis: the one at REDIS_URL when set; otherwise a private redis-server on a free loopback port
  with AOF on and its data under ./var (never someone else's Redis by accident).
- The sandbox, when AWORK_API_URL is not set, seeded with demo entities; its upload host is then
  allowed for PUTs automatically.
- Flower with basic auth: FLOWER_BASIC_AUTH, or a generated password printed once.
- Ctrl-C (or SIGTERM) stops every process it started.

The running stack writes var/stack.env (mode 600) so `awork-uploads enqueue` in another shell
finds its Redis; it is removed on exit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ops.local_fleet import FleetOptions, FlowerOptions, LocalFleet, SandboxOptions
from ops.local_fleet import ping_workers as ping_workers  # where they were first: still importable
from ops.local_fleet import worker_argv as worker_argv
from producers.config import STACK_ENV_FILE, redact_url


@dataclass
class StackConfig:
    workers: int = 2
    concurrency: int = 8
    data_dir: Path = Path("var")
    flower: bool = True
    flower_port: int = 5555
    sandbox_args: list[str] = field(default_factory=list)
    worker_env: dict[str, str] = field(default_factory=dict)
    log_level: str = "INFO"
    ha: bool = False  # --ha: Redis master + replica + 3 sentinels (ops/redis_ha.py)


@dataclass
class Stack:
    """The fleet as the stack starts it from this shell's environment, and var/stack.env."""

    config: StackConfig
    fleet: LocalFleet | None = None
    ha: Any = None  # ops.redis_ha.RedisHA, with --ha
    flower_auth: str | None = None
    flower_auth_generated: bool = False

    def options(self) -> FleetOptions:
        cfg = self.config
        env = {**os.environ, **cfg.worker_env}
        sandbox = None
        if not env.get("AWORK_API_URL"):
            sandbox = SandboxOptions(
                api_keys={secrets.token_urlsafe(24): "default"},
                admin_token=secrets.token_urlsafe(16),
                args=["--seed-demo", *cfg.sandbox_args],
            )
        flower = None
        if cfg.flower:
            self.flower_auth = env.get("FLOWER_BASIC_AUTH", "")
            if not self.flower_auth:
                self.flower_auth = f"admin:{secrets.token_urlsafe(12)}"
                self.flower_auth_generated = True
            flower = FlowerOptions(cfg.flower_port, self.flower_auth, cfg.data_dir.resolve() / "flower.db")
        return FleetOptions(
            root=cfg.data_dir,
            workers=cfg.workers,
            concurrency=cfg.concurrency,
            loglevel=cfg.log_level,
            # Ctrl-C: running steps get 10 s, then go back to the queue; stop() waits 15 s.
            env={**cfg.worker_env, "AWORK_SHUTDOWN_GRACE": env.get("AWORK_SHUTDOWN_GRACE", "10")},
            drop_env=(),
            redis_url=env.get("REDIS_URL") or None,
            redis_password=True,
            appendfsync="always",
            staging_dir=Path(env["STAGING_DIR"]) if env.get("STAGING_DIR") else None,
            sandbox=sandbox,
            flower=flower,
        )

    # -- start -------------------------------------------------------------------------------
    def start(self) -> Stack:
        """Start everything without waiting for it (wait_ready does); on failure, stop and raise."""
        try:
            if self.config.ha:
                self._start_ha()
            self.fleet = LocalFleet(self.options()).start(wait=False)
            self._write_env_file()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_ha(self) -> None:
        """--ha: the fleet's Redis is a master, a replica and three sentinels (REDIS_URL=sentinel://)."""
        from ops.redis_ha import RedisHA

        self.ha = RedisHA(self.config.data_dir.resolve() / "ha").start()
        self.config.worker_env.update(self.ha.env)
        os.environ.update(self.ha.env)  # this process pings the workers: a client too

    def _write_env_file(self) -> None:
        path = self.config.data_dir / STACK_ENV_FILE.name
        names = ("REDIS_URL", "REDIS_SENTINEL_MASTER", "REDIS_SENTINEL_PASSWORD", "STAGING_DIR")
        lines = [f"{name}={self.env[name]}" for name in names if self.env.get(name)]
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write("\n".join(lines) + "\n")

    # -- use ---------------------------------------------------------------------------------
    @property
    def env(self) -> dict[str, str]:
        return self.fleet.env if self.fleet is not None else {}

    @property
    def sandbox(self) -> Any:
        """The sandbox (ops.sandbox.launcher.SandboxProcess), None with AWORK_API_URL set."""
        return self.fleet.sandbox if self.fleet is not None else None

    @property
    def flower_url(self) -> str | None:
        return self.fleet.flower.url if self.fleet is not None and self.fleet.flower is not None else None

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until every worker answers ping and Flower its health check (or raise)."""
        assert self.fleet is not None
        self.fleet.wait_ready(timeout)

    def describe(self) -> dict[str, Any]:
        fleet = self.fleet
        out: dict[str, Any] = {
            "redis": redact_url(self.env.get("REDIS_URL", "")),
            "embedded_redis": (fleet is not None and fleet.redis is not None) or self.ha is not None,
            "redis_ha": self.ha is not None,
            "workers": len(fleet.workers) if fleet is not None else 0,
            "staging_dir": self.env.get("STAGING_DIR"),
            "api_url": self.env.get("AWORK_API_URL"),
            "flower": self.flower_url,
        }
        if self.sandbox is not None:
            out["sandbox_admin"] = self.sandbox.admin_url
            out["sandbox_entities"] = self.sandbox.entities
        return out

    # -- stop --------------------------------------------------------------------------------
    def stop(self, grace: float = 15.0) -> None:
        try:
            if self.fleet is not None:
                self.fleet.stop(grace)
        finally:
            if self.ha is not None:
                self.ha.stop()
            with contextlib.suppress(FileNotFoundError):
                (self.config.data_dir / STACK_ENV_FILE.name).unlink()

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="awork-uploads stack", description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--concurrency", type=int, default=8, help="threads per worker (default 8)")
    p.add_argument("--data-dir", type=Path, default=Path("var"), help="where Redis, logs and staging live")
    p.add_argument("--flower-port", type=int, default=5555)
    p.add_argument("--no-flower", action="store_true")
    p.add_argument("--ha", action="store_true", help="Redis Sentinel: a master, a replica and 3 sentinels")
    p.add_argument("--json", action="store_true", help="print the stack's description as JSON")
    return p.parse_args(list(argv))


def config_from_args(args: argparse.Namespace) -> StackConfig:
    return StackConfig(
        workers=args.workers,
        concurrency=args.concurrency,
        data_dir=args.data_dir,
        flower=not args.no_flower,
        flower_port=args.flower_port,
        ha=args.ha,
    )


def print_banner(stack: Stack, as_json: bool = False) -> None:
    info = stack.describe()
    if as_json:
        print(json.dumps(info), flush=True)
        return
    print("awork-uploads stack is up", flush=True)
    for key, value in info.items():
        if key != "sandbox_entities":
            print(f"  {key:<16} {value}")
    if stack.flower_url and stack.flower_auth_generated and stack.flower_auth:
        print(f"  flower login     {stack.flower_auth}  (generated; set FLOWER_BASIC_AUTH to choose)")
    print(f"  other shells:    export $(cat {stack.config.data_dir}/stack.env)  (or run from here)")
    print("Ctrl-C stops everything.", flush=True)


def run_until_signal() -> None:
    stopping = False

    def handler(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    while not stopping:
        time.sleep(0.2)


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    stack = Stack(config_from_args(args))
    try:
        stack.start()
        stack.wait_ready()
        print_banner(stack, args.json)
        run_until_signal()
    finally:
        print("stopping...", file=sys.stderr, flush=True)
        stack.stop()
    return 0
