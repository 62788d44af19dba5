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

from ops.processes import Child, stop_all
from ops.redis_server import RedisServer, free_port
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
    config: StackConfig
    redis: RedisServer | None = None
    ha: Any = None  # ops.redis_ha.RedisHA, with --ha
    sandbox: Any = None  # ops.sandbox.launcher.SandboxProcess
    workers: list[Child] = field(default_factory=list)
    flower: Child | None = None
    env: dict[str, str] = field(default_factory=dict)
    flower_url: str | None = None
    flower_auth: str | None = None
    flower_auth_generated: bool = False

    # -- start -------------------------------------------------------------------------------
    def start(self) -> Stack:
        data = self.config.data_dir.resolve()
        data.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.update(self.config.worker_env)
        try:
            if self.config.ha:
                from ops.redis_ha import RedisHA

                self.ha = RedisHA(data / "ha").start()
                env.update(self.ha.env)
                os.environ.update(self.ha.env)  # this process pings the workers: a client too
            if not env.get("REDIS_URL"):
                password = secrets.token_urlsafe(16)
                self.redis = RedisServer(data / "redis", password=password, appendfsync="always").start()
                env["REDIS_URL"] = self.redis.url
            env.setdefault("STAGING_DIR", str(data / "staging"))
            # Ctrl-C: running steps get 10 s, then go back to the queue; stop() waits 15 s.
            env.setdefault("AWORK_SHUTDOWN_GRACE", "10")
            if not env.get("AWORK_API_URL"):
                self._start_sandbox(env, data)
            self.env = env
            for i in range(self.config.workers):
                self.workers.append(self._worker(i + 1).start())
            if self.config.flower:
                self._start_flower(data)
            self._write_env_file()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_sandbox(self, env: dict[str, str], data: Path) -> None:
        from ops.sandbox.launcher import SandboxProcess

        api_key = secrets.token_urlsafe(24)
        sandbox = SandboxProcess(
            api_keys={api_key: "default"},
            admin_token=secrets.token_urlsafe(16),
            data_dir=data / "sandbox",
            extra_args=["--seed-demo", *self.config.sandbox_args],
        )
        sandbox.start()
        self.sandbox = sandbox
        env["AWORK_API_URL"] = sandbox.api_url
        env["AWORK_API_KEY"] = api_key
        hosts = [h for h in env.get("AWORK_UPLOAD_HOSTS", "").split(",") if h.strip()]
        env["AWORK_UPLOAD_HOSTS"] = ",".join([*hosts, sandbox.upload_host])

    def _worker(self, n: int) -> Child:
        argv = worker_argv(self.config.concurrency, f"w{n}@%h", self.config.log_level)
        log = self.config.data_dir.resolve() / "logs" / f"worker-{n}.log"
        return Child(f"worker-{n}", argv, self.env, log)

    def _start_flower(self, data: Path) -> None:
        auth = self.env.get("FLOWER_BASIC_AUTH", "")
        if not auth:
            auth = f"admin:{secrets.token_urlsafe(12)}"
            self.flower_auth_generated = True
        self.flower_auth = auth
        port = self.config.flower_port
        if port == 0 or not _port_free(port):
            port = free_port()
        from ops.flower import FlowerProcess

        # The auth reaches Flower through its environment: it never appears in `ps`.
        flower = FlowerProcess(
            self.env,
            port=port,
            basic_auth=auth,
            persistent_db=data / "flower.db",
            log_path=data / "logs" / "flower.log",
        )
        self.flower = flower.launch()
        self.flower_url = flower.url

    def _write_env_file(self) -> None:
        path = self.config.data_dir / STACK_ENV_FILE.name
        names = ("REDIS_URL", "REDIS_SENTINEL_MASTER", "REDIS_SENTINEL_PASSWORD", "STAGING_DIR")
        lines = [f"{name}={self.env[name]}" for name in names if self.env.get(name)]
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write("\n".join(lines) + "\n")

    # -- use ---------------------------------------------------------------------------------
    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until every worker answers ping (or raise)."""
        wait_for_workers(self.env, self.workers, timeout, self.config.data_dir / "logs")

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "redis": redact_url(self.env.get("REDIS_URL", "")),
            "embedded_redis": self.redis is not None or self.ha is not None,
            "redis_ha": self.ha is not None,
            "workers": len(self.workers),
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
        children = [*self.workers, *([self.flower] if self.flower else [])]
        stop_all(children, grace)
        if self.sandbox is not None:
            self.sandbox.stop()
        if self.redis is not None:
            self.redis.stop()
        if self.ha is not None:
            self.ha.stop()
        with contextlib.suppress(FileNotFoundError):
            (self.config.data_dir / STACK_ENV_FILE.name).unlink()

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def worker_argv(concurrency: int, hostname: str, loglevel: str = "INFO") -> list[str]:
    return [
        sys.executable, "-m", "celery", "-A", "workers", "worker",
        "--pool=threads", f"--concurrency={concurrency}",
        "--queues=awork.api,awork.transfer,awork.callbacks", f"--hostname={hostname}",
        f"--loglevel={loglevel}", "--without-mingle", "--without-gossip",
    ]  # fmt: skip


def ping_workers(env: dict[str, str]) -> int:
    from celery import Celery

    from producers.broker import celery_config

    app = Celery("stack-ping", set_as_current=False)
    app.conf.update(celery_config(env["REDIS_URL"]))
    try:
        replies = app.control.ping(timeout=1.0) or []
        return len(replies)
    except Exception:
        return 0
    finally:
        app.close()


def wait_for_workers(env: dict[str, str], workers: Sequence[Child], timeout: float, logs: Path) -> None:
    """Until every one of `workers` answers ping; RuntimeError as soon as one has exited,
    TimeoutError after `timeout` seconds (both name the log directory)."""
    deadline = time.monotonic() + timeout
    while True:
        dead = [w.name for w in workers if not w.alive()]
        if dead:
            raise RuntimeError(f"{', '.join(dead)} exited; see {logs}/")
        if ping_workers(env) >= len(workers):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"workers not ready after {timeout:.0f}s; see {logs}/")
        time.sleep(0.5)


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


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
