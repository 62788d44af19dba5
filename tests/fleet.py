"""A whole fleet for end-to-end tests: private Redis, the sandbox, real worker processes.

Workers are real `celery -A workers worker` processes talking real HTTP on loopback to the
sandbox. Each test seeds its own entities, so tests share one fleet without interfering.
"""

from __future__ import annotations

import re
import secrets
import time
import uuid
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import redis

from ops.demo_files import random_file
from ops.local_fleet import PRODUCER_NAMES, FleetOptions, FleetWorker, LocalFleet, SandboxOptions
from producers.client import Uploads
from producers.keys import job_key, step_lock_key
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


class Fleet(LocalFleet):
    """The tests' fleet: the sandbox with two workspaces (`default` and `second`), fast retries,
    worker node names unique per process (so `holder` can tell which process runs a step)."""

    def __init__(
        self,
        root: Path,
        worker_count: int = 2,
        concurrency: int = 4,
        extra_env: dict[str, str] | None = None,
        sandbox_args: list[str] | None = None,
        appendfsync: str = "everysec",  # "always": a Redis SIGKILL loses no acknowledged write
        via_proxy: bool = False,  # workers reach Redis through a TcpProxy (self.proxy); tests do not
    ) -> None:
        workspaces = Path(root) / "workspaces.toml"
        env = {
            "SECOND_AWORK_KEY": SECOND_KEY,
            "AWORK_WORKSPACES_FILE": str(workspaces),
            "AWORK_RETRY_BASE_SECONDS": "0.3",
            "AWORK_RETRY_MAX_SECONDS": "2",
            "AWORK_MAX_ATTEMPTS": "6",
            # stop() gives workers 10 s: hand running steps back well before that
            "AWORK_SHUTDOWN_GRACE": "5",
            **(extra_env or {}),
        }
        super().__init__(
            FleetOptions(
                root=Path(root),
                workers=worker_count,
                concurrency=concurrency,
                node_name="w{n}-{uid}@{host}",
                env=env,
                appendfsync=appendfsync,
                via_proxy=via_proxy,
                sandbox=SandboxOptions(
                    api_keys={API_KEY: "default", SECOND_KEY: "second"},
                    admin_token=ADMIN_TOKEN,
                    args=list(sandbox_args or []),
                ),
                stop_grace=10,
            )
        )
        self._uploads: Uploads | None = None

    def start(self, wait: bool = True) -> Fleet:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "workspaces.toml").write_text(
            '[workspaces.default]\napi_key_env = "AWORK_API_KEY"\n\n'
            '[workspaces.second]\napi_key_env = "SECOND_AWORK_KEY"\n'
        )
        return super().start(wait)

    def wait_ready(self, timeout: float | None = None, *, exited_ok: bool = True) -> None:
        """Until the workers alive now answer ping (a test may have killed some)."""
        super().wait_ready(timeout, exited_ok=exited_ok)

    def holder(self, job_id: str, timeout: float = 1.0) -> FleetWorker | None:
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

    # -- helpers for tests -------------------------------------------------------------------
    @property
    def uploads(self) -> Uploads:
        if self._uploads is None:
            shared = (*PRODUCER_NAMES, "AWORK_SINGLE_PUT_THRESHOLD", "AWORK_BLOCK_SIZE")
            self._uploads = self.producer(shared)
        return self._uploads

    def client(self) -> redis.Redis:
        assert self.redis is not None
        return self.redis_client()

    def entity(self, kind: str) -> str:
        """Seed a fresh entity of `kind` (plural path name) and return its id."""
        entity_id = str(uuid.uuid4())
        assert self.sandbox is not None
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
        assert self.sandbox is not None
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


def holder_of(fleet: Fleet, job_id: str, timeout: float = 20) -> FleetWorker:
    """The worker process holding a step of `job_id`, waiting until one does."""
    found: list[FleetWorker] = []

    def look() -> bool:
        child = fleet.holder(job_id)
        if child is not None:
            found.append(child)
        return bool(found)

    wait_until(look, timeout, f"a worker holding job {job_id}", interval=0.1)
    return found[0]


def put_running(fleet: Fleet, job_id: str) -> bool:
    """The job's put step runs: marked `running` in its record, and its step lock held."""
    client = fleet.client()
    try:
        return client.hget(job_key(job_id), "running") == "put" and bool(
            client.exists(step_lock_key(job_id, "put"))
        )
    finally:
        client.close()


def kill_a_running_put(fleet: Fleet, tmp_path: Path) -> tuple[Job, str, float]:
    """Enqueue a file whose PUT hangs (30 s of latency on the blob route), SIGKILL the worker
    running it, then lift the latency. Returns the job, its task entity and the monotonic time
    of the kill."""
    fleet.sandbox.set_faults({"routes": {"blob": {"latency_ms": 30_000}}})
    try:
        entity = fleet.entity("tasks")
        f = random_file(tmp_path / "slow.bin", 200_000)
        job = fleet.uploads.enqueue(f, to=f"task:{entity}")
        wait_until(lambda: put_running(fleet, job.id), 30, "put running")
        holder_of(fleet, job.id).kill()
        killed_at = time.monotonic()
    finally:
        fleet.sandbox.set_faults({"routes": {"blob": {"latency_ms": 0}}})
    return job, entity, killed_at


# A worker log line of a step that completed (workers/step_runner.py logs outcome=ok).
LOG_LINE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): .*outcome=ok")


def first_step_after(log: Path, since: float) -> float | None:
    """Seconds from `since` (unix time) to the first step this worker completed after it."""
    for line in log.read_text(errors="replace").splitlines():
        m = LOG_LINE.match(line)
        if m:
            at = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            if at >= since:
                return at - since
    return None
