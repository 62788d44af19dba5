"""A whole fleet for end-to-end tests: private Redis, the sandbox, real worker processes.

Workers are real `celery -A workers worker` processes talking real HTTP on loopback to the
sandbox. Each test seeds its own entities, so tests share one fleet without interfering.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from ops.processes import Child, stop_all
from ops.redis_server import RedisServer
from ops.sandbox.launcher import SandboxProcess
from ops.stack import ping_workers, worker_argv
from ops.tcp_proxy import TcpProxy
from producers.client import Uploads
from producers.config import SharedSettings
from producers.records import Job

API_KEY = "test-key-" + secrets.token_hex(8)
SECOND_KEY = "second-key-" + secrets.token_hex(8)
ADMIN_TOKEN = "admin-" + secrets.token_hex(8)
# Sweeper, lock and shutdown timings short enough for tests of lost workers (seconds).
FAST = {
    "AWORK_LOCK_TTL_SECONDS": "4",
    "AWORK_HEARTBEAT_SECONDS": "1",
    "AWORK_SWEEPER_INTERVAL": "1",
    "AWORK_SWEEPER_STALL": "3",
    "AWORK_SWEEPER_COOLDOWN": "4",
    "AWORK_SWEEPER_UNPUBLISHED": "3",
    "AWORK_SWEEPER_LOST_COUNTDOWN": "10",
    "AWORK_SWEEPER_IDLE": "20",
    "AWORK_MAX_CRASHES": "2",
    "AWORK_SHUTDOWN_GRACE": "5",
}


@dataclass
class Fleet:
    root: Path
    worker_count: int = 2
    concurrency: int = 4
    extra_env: dict[str, str] = field(default_factory=dict)
    sandbox_args: list[str] = field(default_factory=list)
    appendfsync: str = "everysec"  # "always": a Redis SIGKILL loses no acknowledged write
    via_proxy: bool = False  # workers reach Redis through a TcpProxy (self.proxy); tests do not
    redis: RedisServer | None = None
    proxy: TcpProxy | None = None
    sandbox: Any = None
    workers: list[Child] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    hostnames: dict[str, Child] = field(default_factory=dict)  # celery node name -> its process
    _uploads: Uploads | None = None

    def start(self) -> Fleet:
        self.redis = RedisServer(self.root / "redis", appendfsync=self.appendfsync).start()
        if self.via_proxy:
            self.proxy = TcpProxy("127.0.0.1", self.redis.port).start()
        self.sandbox = SandboxProcess(
            api_keys={API_KEY: "default", SECOND_KEY: "second"},
            admin_token=ADMIN_TOKEN,
            data_dir=self.root / "sandbox",
            extra_args=self.sandbox_args,
        )
        self.sandbox.start()
        staging = self.root / "staging"
        staging.mkdir(parents=True, exist_ok=True)
        workspaces = self.root / "workspaces.toml"
        workspaces.write_text(
            '[workspaces.default]\napi_key_env = "AWORK_API_KEY"\n\n'
            '[workspaces.second]\napi_key_env = "SECOND_AWORK_KEY"\n'
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWORK_", "FLOWER_"))}
        env.update(
            REDIS_URL=self.redis.url,
            STAGING_DIR=str(staging),
            AWORK_API_URL=self.sandbox.api_url,
            AWORK_API_KEY=API_KEY,
            SECOND_AWORK_KEY=SECOND_KEY,
            AWORK_WORKSPACES_FILE=str(workspaces),
            AWORK_UPLOAD_HOSTS=self.sandbox.upload_host,
            AWORK_RETRY_BASE_SECONDS="0.3",
            AWORK_RETRY_MAX_SECONDS="2",
            AWORK_MAX_ATTEMPTS="6",
            # stop() gives workers 10 s: hand running steps back well before that
            AWORK_SHUTDOWN_GRACE="5",
        )
        env.update(self.extra_env)
        self.env = env
        for n in range(self.worker_count):
            self.add_worker(n + 1)
        self.wait_ready()
        return self

    def add_worker(self, n: int, env: dict[str, str] | None = None) -> Child:
        """Start worker `n` (its node name is w<n>-<random>@<host>); `env` adds to the fleet's."""
        log = self.root / "logs" / f"worker-{n}-{len(self.workers)}.log"
        hostname = f"w{n}-{uuid.uuid4().hex[:6]}@{socket.gethostname()}"
        argv = worker_argv(self.concurrency, hostname)
        via = {"REDIS_URL": self.proxy.url_for(self.env["REDIS_URL"])} if self.proxy is not None else {}
        child = Child(f"worker-{n}", argv, {**self.env, **via, **(env or {})}, log)
        self.workers.append(child.start())
        self.hostnames[hostname] = child
        return child

    def restart(self, child: Child) -> Child:
        """Replace a (killed) worker with a fresh process of the same number."""
        if child in self.workers:
            self.workers.remove(child)
        self.hostnames = {h: c for h, c in self.hostnames.items() if c is not child}
        return self.add_worker(int(child.name.split("-")[1]))

    def holder(self, job_id: str, timeout: float = 1.0) -> Child | None:
        """The worker process running (or holding) a step of this job, by `celery inspect`."""
        from celery import Celery

        from producers.broker import celery_config

        app = Celery("fleet-inspect", set_as_current=False)
        app.conf.update(celery_config(self.env["REDIS_URL"]))
        try:
            inspect = app.control.inspect(timeout=timeout)
            for found in (inspect.active() or {}, inspect.scheduled() or {}):
                for hostname, tasks in found.items():
                    for task in tasks:
                        request = task.get("request", task)
                        if (request.get("kwargs") or {}).get("job_id") == job_id:
                            return self.hostnames.get(hostname)
        finally:
            app.close()
        return None

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        alive = [w for w in self.workers if w.alive()]
        while time.monotonic() < deadline:
            if ping_workers(self.env) >= len(alive):
                return
            time.sleep(0.3)
        for w in alive:  # Celery's SIGUSR1 handler writes every thread's stack to the log
            w.signal(signal.SIGUSR1)
        time.sleep(1)
        raise TimeoutError("workers did not answer ping (stacks in the logs): " + str(self.root / "logs"))

    def stop(self) -> None:
        stop_all(self.workers, grace=10)
        if self._uploads is not None:
            self._uploads.close()
        if self.sandbox is not None:
            self.sandbox.stop()
        if self.proxy is not None:
            self.proxy.close()
        if self.redis is not None:
            self.redis.stop()

    # -- helpers for tests -------------------------------------------------------------------
    @property
    def uploads(self) -> Uploads:
        if self._uploads is None:
            saved = dict(os.environ)
            shared = ("REDIS_URL", "STAGING_DIR", "AWORK_WORKSPACES_FILE", "AWORK_SINGLE_PUT_THRESHOLD",
                      "AWORK_BLOCK_SIZE")
            os.environ.update({k: self.env[k] for k in shared if k in self.env})
            try:
                self._uploads = Uploads(SharedSettings.from_env())
            finally:
                os.environ.clear()
                os.environ.update(saved)
        return self._uploads

    def client(self) -> redis.Redis:
        assert self.redis is not None
        return redis.Redis.from_url(self.redis.url, decode_responses=True)

    def entity(self, kind: str) -> str:
        """Seed a fresh entity of `kind` (plural path name) and return its id."""
        entity_id = str(uuid.uuid4())
        self.sandbox.seed(kind, entity_id)
        return entity_id

    def wait(self, jobs: Iterable[Job], timeout: float = 60) -> list[Job]:
        return self.uploads.wait_many([j.id for j in jobs], timeout=timeout)

    def plant_job(self, first: str = "generate", **fields: str) -> dict[str, str]:
        """A job record as a hostile client with Redis access could write it (`fields` override
        a plain file job on a new task), and its canvas from step `first` published: what the
        workers then do."""
        from producers.canvas import publisher_app
        from producers.records import JobStore
        from producers.redrive import canvas_from

        now = repr(time.time())
        record = {
            "id": uuid.uuid4().hex,
            "state": "queued",
            "workspace": "default",
            "target": f"task:{self.entity('tasks')}",
            "route": "byuploadid",
            "file_name": "planted.txt",
            "content_type": "text/plain",
            "source_kind": "file",
            "source": "",
            "staged_owned": "0",
            "published": "1",
            "created_at": now,
            "updated_at": now,
            **fields,
        }
        JobStore(redis.Redis.from_url(self.env["REDIS_URL"])).create(record, None)
        app = publisher_app(self.env["REDIS_URL"])
        try:
            canvas_from(app, record, first).apply_async()
        finally:
            app.close()
        return record

    def record(self, job_id: str) -> dict[str, str]:
        return self.uploads.store.get(job_id) or {}

    def files_of(self, entity_id: str) -> list[dict[str, Any]]:
        return [f for f in self.sandbox.stats()["files"] if f["entity_id"] == entity_id]


def wait_until(
    predicate: Callable[[], object], timeout: float = 20.0, what: str = "condition", interval: float = 0.2
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"not within {timeout:.0f} s: {what}")


def holder_of(fleet: Fleet, job_id: str, timeout: float = 20) -> Child:
    """The worker process holding a step of `job_id`, waiting until one does."""
    found: list[Child] = []

    def look() -> bool:
        child = fleet.holder(job_id)
        if child is not None:
            found.append(child)
        return bool(found)

    wait_until(look, timeout, f"a worker holding job {job_id}", interval=0.1)
    return found[0]
