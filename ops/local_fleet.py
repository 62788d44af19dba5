"""One machine's fleet: Redis, the sandbox, N worker processes and Flower, started and stopped
in order. The stack, the demo, the soak, the benchmarks and the end-to-end tests all launch
through it, so a fix to start-up or shut-down lands everywhere at once.

- Redis: a private redis-server on a free loopback port (its data under `root/redis`), or the
  one at `redis_url` (pinged before anything else starts).
- The sandbox (`ops.sandbox`), when `sandbox` is given: workers get its API URL, upload host
  and, unless told otherwise, its first API key.
- Workers: real `celery -A workers worker` processes, each its own process group, logging to
  `root/logs/worker-<n>.log`.
- Flower, when `flower` is given.

`start()` returns once Redis answers ping, the sandbox said it is ready, every worker answers
Celery's ping and Flower its health check. `stop()` stops the workers (and Flower) with a grace
period first, then the sandbox, the proxy and Redis; a start that fails half-way stops what it
had started before raising, so no process outlives the fleet.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Self
from urllib.parse import urlsplit

import redis

from ops.processes import Child, stop_all
from ops.redis_server import RedisServer, free_port, new_password
from ops.sandbox.launcher import SandboxProcess
from ops.tcp_proxy import TcpProxy
from producers.client import Uploads
from producers.config import SharedSettings
from producers.contract import QUEUE_API, QUEUE_CALLBACKS, QUEUE_TRANSFER
from producers.redis_conn import redis_client

if TYPE_CHECKING:
    from ops.flower import FlowerProcess  # imports tornado: loaded only when Flower runs

ALL_QUEUES = (QUEUE_API, QUEUE_TRANSFER, QUEUE_CALLBACKS)
# What a producer client of the fleet reads from the fleet's environment by default.
PRODUCER_NAMES = ("REDIS_URL", "STAGING_DIR", "AWORK_WORKSPACES_FILE")


@dataclass
class SandboxOptions:
    """The sandbox to start: its API keys (key -> workspace), admin token and extra arguments."""

    api_keys: dict[str, str]
    admin_token: str
    args: list[str] = field(default_factory=list)
    # Give the workers the first key as AWORK_API_KEY (off when a workspaces file names the keys).
    worker_key: bool = True


@dataclass
class FlowerOptions:
    """Flower on `port` (0, or a port in use: a free one), with `basic_auth` (user:password)."""

    port: int = 0
    basic_auth: str | None = None
    persistent_db: Path | None = None


@dataclass
class FleetOptions:
    """What to start. `env` is applied last: it overrides anything the fleet sets itself."""

    root: Path
    workers: int = 2
    concurrency: int = 8
    pool: str = "threads"
    queues: Sequence[str] = ALL_QUEUES
    loglevel: str = "INFO"
    # The worker's Celery node name: {n} its number, {uid} 6 random hex digits, {host} this host.
    node_name: str = "w{n}@%h"
    env: dict[str, str] = field(default_factory=dict)
    # Variables of this process's environment the workers do not inherit (by prefix).
    drop_env: tuple[str, ...] = ("AWORK_", "FLOWER_")
    redis_url: str | None = None  # an existing Redis; None: start a private redis-server
    redis_password: bool = False  # the private one asks for a random password
    appendonly: bool = True
    appendfsync: str = "everysec"  # "always": a Redis SIGKILL loses no acknowledged write
    via_proxy: bool = False  # workers reach Redis through a TcpProxy (LocalFleet.proxy)
    staging_dir: Path | None = None  # None: root/staging
    sandbox: SandboxOptions | None = None
    flower: FlowerOptions | None = None
    ready_timeout: float = 60.0
    stop_grace: float = 15.0


def worker_argv(
    concurrency: int,
    hostname: str,
    loglevel: str = "INFO",
    queues: Sequence[str] = ALL_QUEUES,
    pool: str = "threads",
) -> list[str]:
    """The command line of one worker process."""
    return [
        sys.executable, "-m", "celery", "-A", "workers", "worker",
        f"--pool={pool}", f"--concurrency={concurrency}",
        f"--queues={','.join(queues)}", f"--hostname={hostname}",
        f"--loglevel={loglevel}", "--without-mingle", "--without-gossip",
    ]  # fmt: skip


def ping_workers(env: Mapping[str, str]) -> int:
    """How many workers on the Redis at env's REDIS_URL answer Celery's ping within 1 s."""
    from celery import Celery

    from producers.broker import celery_config

    app = Celery("fleet-ping", set_as_current=False)
    app.conf.update(celery_config(env["REDIS_URL"]))
    try:
        replies = app.control.ping(timeout=1.0) or []
        return len(replies)
    except Exception:
        return 0
    finally:
        app.close()


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class LocalFleet:
    """Start with `start()` (or `with LocalFleet(options) as fleet:`), stop with `stop()`."""

    def __init__(self, options: FleetOptions) -> None:
        self.options = options
        self.root = Path(options.root).resolve()
        self.redis: RedisServer | None = None
        self.proxy: TcpProxy | None = None
        self.sandbox: SandboxProcess | None = None
        self.flower: FlowerProcess | None = None
        self.workers: list[FleetWorker] = []
        self.hostnames: dict[str, FleetWorker] = {}  # celery node name -> its process
        self.env: dict[str, str] = {}
        self._producers: list[Uploads] = []

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    # -- start -------------------------------------------------------------------------------
    def start(self, wait: bool = True) -> Self:
        """Everything in order; with `wait`, until it is ready. On any failure, stop and raise."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self.env = self._base_env()
            self._start_redis()
            if self.options.sandbox is not None:
                self._start_sandbox(self.options.sandbox)
            self.env.update(self.options.env)
            self.add_workers(self.options.workers)
            if self.options.flower is not None:
                self._start_flower(self.options.flower)
            if wait:
                self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _base_env(self) -> dict[str, str]:
        drop = self.options.drop_env
        env = {k: v for k, v in os.environ.items() if not (drop and k.startswith(drop))}
        staging = Path(self.options.staging_dir or self.root / "staging").resolve()
        staging.mkdir(parents=True, exist_ok=True)
        env["STAGING_DIR"] = str(staging)
        return env

    def _start_redis(self) -> None:
        if self.options.redis_url:
            client = redis_client(self.options.redis_url, socket_connect_timeout=5)
            try:
                client.ping()
            finally:
                client.close()
            self.env["REDIS_URL"] = self.options.redis_url
        else:
            password = new_password() if self.options.redis_password else None
            self.redis = RedisServer(
                self.root / "redis",
                password=password,
                appendonly=self.options.appendonly,
                appendfsync=self.options.appendfsync,
            ).start()
            self.env["REDIS_URL"] = self.redis.url
        if self.options.via_proxy:
            target = self.redis.port if self.redis is not None else _port_of(self.env["REDIS_URL"])
            self.proxy = TcpProxy("127.0.0.1", target).start()

    def _start_sandbox(self, opts: SandboxOptions) -> None:
        self.sandbox = SandboxProcess(
            api_keys=opts.api_keys,
            admin_token=opts.admin_token,
            data_dir=self.root / "sandbox",
            extra_args=opts.args,
        )
        self.sandbox.start()
        self.env["AWORK_API_URL"] = self.sandbox.api_url
        if opts.worker_key:
            self.env["AWORK_API_KEY"] = self.sandbox.api_key
        hosts = [h for h in self.env.get("AWORK_UPLOAD_HOSTS", "").split(",") if h.strip()]
        self.env["AWORK_UPLOAD_HOSTS"] = ",".join([*hosts, self.sandbox.upload_host])

    def _start_flower(self, opts: FlowerOptions) -> None:
        from ops.flower import FlowerProcess

        port = opts.port if opts.port and port_free(opts.port) else free_port()
        # The auth reaches Flower through its environment: it never appears in `ps`.
        self.flower = FlowerProcess(
            self.env,
            port=port,
            basic_auth=opts.basic_auth,
            persistent_db=opts.persistent_db,
            log_path=self.logs / "flower.log",
        )
        self.flower.launch()

    # -- workers -----------------------------------------------------------------------------
    def add_workers(self, count: int) -> list[FleetWorker]:
        """Start `count` more workers, numbered after the ones there are (not waiting for them)."""
        first = len(self.workers) + 1
        return [self.add_worker(n) for n in range(first, first + count)]

    def add_worker(self, n: int, env: Mapping[str, str] | None = None) -> FleetWorker:
        """Start worker number `n` (not waiting for it); `env` adds to the fleet's environment."""
        child = self._worker(n, env)
        self.workers.append(child)
        return child

    def restart(self, child: FleetWorker) -> FleetWorker:
        """Start a fresh process in the place of `child` (killed, or stopped here first)."""
        child.stop(self.options.stop_grace)
        fresh = self._worker(int(child.name.rsplit("-", 1)[1]), child.extra_env)
        if child in self.workers:
            self.workers[self.workers.index(child)] = fresh
        else:
            self.workers.append(fresh)
        self.hostnames = {h: c for h, c in self.hostnames.items() if c is not child}
        self.hostnames[fresh.node_name] = fresh
        return fresh

    def stop_worker(self, child: FleetWorker, grace: float | None = None) -> None:
        """Stop one worker (SIGTERM, `grace` seconds, SIGKILL); the fleet forgets it."""
        child.stop(self.options.stop_grace if grace is None else grace)
        if child in self.workers:
            self.workers.remove(child)
        self.hostnames = {h: c for h, c in self.hostnames.items() if c is not child}

    def _worker(self, n: int, env: Mapping[str, str] | None) -> FleetWorker:
        opts = self.options
        node = opts.node_name.format(n=n, uid=uuid.uuid4().hex[:6], host=socket.gethostname())
        argv = worker_argv(opts.concurrency, node, opts.loglevel, opts.queues, opts.pool)
        via = {"REDIS_URL": self.proxy.url_for(self.env["REDIS_URL"])} if self.proxy is not None else {}
        log = self.logs / f"worker-{n}.log"
        child = FleetWorker(f"worker-{n}", argv, {**self.env, **via, **(env or {})}, log, node, env)
        child.start()
        self.hostnames[node] = child
        return child

    def wait_ready(self, timeout: float | None = None, *, exited_ok: bool = False) -> None:
        """Until every worker answers Celery's ping, then Flower its health check.

        A worker that exits meanwhile is a RuntimeError (with `exited_ok`, the ones alive at the
        call are waited for); after `timeout` each worker writes its threads' stacks to its log
        (Celery's SIGUSR1) and it is a TimeoutError. Both name the log directory."""
        timeout = self.options.ready_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        waited = [w for w in self.workers if w.alive()] if exited_ok else list(self.workers)
        while True:
            dead = [w.name for w in waited if not w.alive()]
            if dead:
                raise RuntimeError(f"{', '.join(dead)} exited; see {self.logs}/")
            if ping_workers(self.env) >= len(waited):
                break
            if time.monotonic() > deadline:
                for w in waited:
                    w.signal(signal.SIGUSR1)
                time.sleep(1)
                raise TimeoutError(
                    f"workers not ready after {timeout:.0f}s (stacks in the logs); see {self.logs}/"
                )
            time.sleep(0.3)
        if self.flower is not None:
            self.flower.wait_ready(max(5.0, deadline - time.monotonic()))

    # -- producers ---------------------------------------------------------------------------
    def shared_settings(self, names: Iterable[str] = PRODUCER_NAMES) -> SharedSettings:
        """The producers' settings for this fleet: `names` as the fleet's environment has them
        (a name it does not have is unset), read by SharedSettings.from_env."""
        saved = dict(os.environ)
        try:
            for name in names:
                if name in self.env:
                    os.environ[name] = self.env[name]
                else:
                    os.environ.pop(name, None)
            return SharedSettings.from_env()
        finally:
            os.environ.clear()
            os.environ.update(saved)

    def producer(self, names: Iterable[str] = PRODUCER_NAMES, redis_retry_seconds: float = 10.0) -> Uploads:
        """A producer client of this fleet (settings as `shared_settings(names)`); stop() closes it."""
        client = Uploads(self.shared_settings(names), redis_retry_seconds=redis_retry_seconds)
        self._producers.append(client)
        return client

    def redis_client(self, decode_responses: bool = True) -> redis.Redis:
        return redis_client(self.env["REDIS_URL"], decode_responses=decode_responses)

    # -- stop --------------------------------------------------------------------------------
    def stop(self, grace: float | None = None) -> None:
        """Workers and Flower (SIGTERM, `grace` seconds, SIGKILL), then the sandbox, the proxy,
        Redis. Safe to call twice, and after a start that failed half-way."""
        grace = self.options.stop_grace if grace is None else grace
        children = [*self.workers, *([self.flower.child] if self.flower is not None else [])]
        try:
            stop_all(children, grace)
        finally:
            try:
                for client in self._producers:
                    client.close()
                self._producers.clear()
                if self.sandbox is not None:
                    self.sandbox.stop()
            finally:
                if self.proxy is not None:
                    self.proxy.close()
                if self.redis is not None:
                    self.redis.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class FleetWorker(Child):
    """A worker process: a Child with its Celery node name and the environment added to the
    fleet's (a restart gives the fresh process the same)."""

    def __init__(
        self, name: str, argv: Sequence[str], env: Mapping[str, str], log_path: Path, node_name: str,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:  # fmt: skip
        super().__init__(name, argv, env, log_path)
        self.node_name = node_name
        self.extra_env = dict(extra_env or {})


def _port_of(url: str) -> int:
    return urlsplit(url).port or 6379


__all__ = [
    "ALL_QUEUES",
    "FleetOptions",
    "FlowerOptions",
    "LocalFleet",
    "SandboxOptions",
    "ping_workers",
    "port_free",
    "worker_argv",
]
