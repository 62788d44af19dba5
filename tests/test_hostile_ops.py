"""Issue #11, the operations items: Flower read-only (#11.8) and the smaller items of #11.12
(no http:// API URL off loopback, the sandbox's own key, constant-time secret checks).

The Flower tests run a real Flower and a real worker on a private redis-server, and check both
the answer (403) and that nothing happened (the worker still answers ping and still consumes
its queue, no task was sent, nothing was revoked).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from celery import Celery

from ops.flower import CONTROL_ENV, FlowerProcess, control_allowed
from ops.flower_server import REFUSAL
from ops.local_fleet import FleetOptions, LocalFleet, worker_argv
from ops.processes import Child
from producers.broker import celery_config
from producers.config import ConfigError
from producers.contract import QUEUE_API

AUTH = f"operator:pw-{uuid.uuid4().hex}"
PUT_FILE = "awork.put_file"
SENT_KWARGS = {"job_id": "0" * 32, "workspace": "default", "target": "task:x", "file_name": "a.txt"}


@dataclass
class Rig:
    """A private Redis and one worker consuming awork.api only (awork.transfer piles up)."""

    root: Path
    env: dict[str, str]
    worker: str
    redis: redis.Redis
    app: Celery

    def queued(self) -> int:
        """Messages waiting in any Redis list (a sent task lands in awork.transfer)."""
        return sum(int(self.redis.llen(k)) for k in self.redis.scan_iter() if self.redis.type(k) == b"list")

    def ping(self) -> bool:
        return bool(self.app.control.ping(destination=[self.worker], timeout=3.0))

    def queues(self) -> set[str]:
        found = self.app.control.inspect(destination=[self.worker], timeout=3.0).active_queues() or {}
        return {q["name"] for q in found.get(self.worker, [])}

    def revoked(self) -> list[str]:
        found = self.app.control.inspect(destination=[self.worker], timeout=3.0).revoked() or {}
        return list(found.get(self.worker, []))

    @contextmanager
    def flower(self, name: str, **kwargs: Any) -> Iterator[FlowerProcess]:
        """A started Flower on this Redis, stopped on exit (started once: `with` does not restart it)."""
        process = FlowerProcess(self.env, basic_auth=AUTH, log_path=self.root / f"{name}.log", **kwargs)
        process.start(timeout=60)
        try:
            yield process
        finally:
            process.stop()


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    root = tmp_path_factory.mktemp("hostile-ops")
    options = FleetOptions(
        root=root,
        workers=1,
        concurrency=1,
        queues=(QUEUE_API,),
        node_name="hostile-{uid}@{host}",
        appendonly=False,
        ready_timeout=180,
        stop_grace=10,
    )
    with LocalFleet(options) as fleet:
        app = Celery("hostile-ops", set_as_current=False)
        app.conf.update(celery_config(fleet.env["REDIS_URL"]))
        client = fleet.redis_client(decode_responses=False)
        try:
            yield Rig(root, fleet.env, fleet.workers[0].node_name, client, app)
        finally:
            app.close()
            client.close()


def control_requests(worker: str, task_id: str) -> list[tuple[str, dict[str, Any]]]:
    """Every control route of Flower 2.2, with arguments that would do harm if obeyed."""
    task_body = {"json": {"kwargs": SENT_KWARGS}}
    return [
        (f"/api/task/send-task/{PUT_FILE}", task_body),
        (f"/api/task/async-apply/{PUT_FILE}", task_body),
        (f"/api/task/apply/{PUT_FILE}", task_body),
        (f"/api/task/revoke/{task_id}", {"data": {"terminate": "true"}}),
        (f"/api/task/abort/{task_id}", {}),
        (f"/api/task/timeout/{PUT_FILE}", {"data": {"soft": "1", "hard": "2", "workername": worker}}),
        (f"/api/task/rate-limit/{PUT_FILE}", {"data": {"ratelimit": "1/h", "workername": worker}}),
        (f"/api/worker/queue/cancel-consumer/{worker}", {"data": {"queue": "awork.api"}}),
        (f"/api/worker/queue/add-consumer/{worker}", {"data": {"queue": "hostile.extra"}}),
        (f"/api/worker/pool/grow/{worker}", {"data": {"n": "2"}}),
        (f"/api/worker/pool/shrink/{worker}", {"data": {"n": "1"}}),
        (f"/api/worker/pool/autoscale/{worker}", {"data": {"min": "1", "max": "4"}}),
        (f"/api/worker/pool/restart/{worker}", {}),
        (f"/api/worker/shutdown/{worker}", {}),
    ]


@pytest.mark.slow
def test_flower_is_read_only_by_default(rig: Rig) -> None:
    """#11.8: every control route answers 403, for any method, and nothing was done."""
    task_id = str(uuid.uuid4())
    before = rig.queued()
    with rig.flower("flower-read-only") as flower:
        assert flower.get("/api/workers", refresh="1").status_code == 200  # Flower knows the worker
        for path, body in control_requests(rig.worker, task_id):
            for auth in (flower.credentials, None):
                response = requests.post(f"{flower.url}{path}", auth=auth, timeout=15, **body)
                assert response.status_code == 403, (path, auth is not None, response.status_code)
                assert response.text == REFUSAL, path
            assert requests.get(f"{flower.url}{path}", auth=flower.credentials, timeout=15).status_code == 403
        # the UI and the read API still work
        for page in ("/", "/workers", f"/worker/{rig.worker}", "/tasks", "/broker", "/api/workers",
                     "/api/tasks", "/api/task/types", "/api/queues/length"):  # fmt: skip
            assert flower.get(page).status_code == 200, page
        table = {
            "draw": "1",
            "start": "0",
            "length": "9",
            "order[0][column]": "0",
            "columns[0][data]": "name",
        }
        url = f"{flower.url}/tasks/datatable"
        assert requests.get(url, params=table, auth=flower.credentials, timeout=15).json()["draw"] == 1
        # what the tasks page sends
        assert requests.post(url, data=table, auth=flower.credentials, timeout=15).json()["draw"] == 1
        assert flower.get(f"/api/task/info/{task_id}").status_code == 404
    # nothing happened: alive, still consuming awork.api only, nothing sent, nothing revoked
    assert rig.ping()
    assert rig.queues() == {"awork.api"}
    assert rig.queued() == before
    assert task_id not in rig.revoked()


@pytest.mark.slow
def test_flower_control_is_an_explicit_opt_in(rig: Rig) -> None:
    """#11.8: with AWORK_FLOWER_CONTROL=1 Flower's control API works (so the 403s above are
    the read-only table's doing, and the checks above can see an effect)."""
    before = rig.queued()
    with rig.flower("flower-control", allow_control=True) as flower:
        assert flower.allow_control
        assert flower.get("/api/workers", refresh="1").status_code == 200
        sent = flower.post(f"/api/task/send-task/{PUT_FILE}")
        assert sent.status_code == 200, sent.text
        assert rig.queued() == before + 1
        for queue in ("awork.api",):
            cancelled = flower.post(f"/api/worker/queue/cancel-consumer/{rig.worker}", queue=queue)
            assert cancelled.status_code == 200, cancelled.text
            assert queue not in rig.queues()
            added = flower.post(f"/api/worker/queue/add-consumer/{rig.worker}", queue=queue)
            assert added.status_code == 200, added.text
            assert rig.queues() == {"awork.api"}
    # the environment variable is the same opt-in
    env_flower = FlowerProcess({**rig.env, CONTROL_ENV: "1"}, basic_auth=AUTH)
    assert env_flower.allow_control and "--allow-control" in env_flower.child.argv


def test_flower_control_switch_is_parsed_strictly() -> None:
    """#11.8: off unless asked; a value that is neither true nor false is an error naming the variable."""
    assert not control_allowed(False, {})
    assert not control_allowed(False, {CONTROL_ENV: "0"})
    assert control_allowed(False, {CONTROL_ENV: "yes"})
    assert control_allowed(True, {})
    with pytest.raises(ConfigError, match=CONTROL_ENV):
        control_allowed(False, {CONTROL_ENV: "maybe"})
    assert "--allow-control" not in FlowerProcess({"REDIS_URL": "redis://127.0.0.1:1/0"}).child.argv


# -- #11.12: the API key never goes out over plain http ----------------------------------------------
@pytest.fixture
def worker_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    for key in list(os.environ):
        if key.startswith("AWORK_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("STAGING_DIR", str(tmp_path / "staging"))
    monkeypatch.setenv("AWORK_API_KEY", "k")
    return monkeypatch


def test_api_url_must_be_https_off_loopback(worker_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """#11.12: http:// AWORK_API_URL (or a workspace's api_url) is refused unless it points at
    loopback or AWORK_ALLOW_INSECURE_API=1; the error names the variable."""
    from workers.settings import WorkerSettings

    for url in ("http://api.example.com/api/v1", "http://10.0.0.5:8765/api/v1", "http://sandbox:8765/api/v1",
                "http://localhost.evil.example/api", "http://127.0.0.1.evil.example/api"):  # fmt: skip
        worker_env.setenv("AWORK_API_URL", url)
        with pytest.raises(
            ConfigError, match=r"^AWORK_API_URL: http:// .*clear text.*AWORK_ALLOW_INSECURE_API"
        ):
            WorkerSettings.from_env()
        worker_env.setenv("AWORK_ALLOW_INSECURE_API", "1")
        assert WorkerSettings.from_env().api_url == url.rstrip("/")
        worker_env.delenv("AWORK_ALLOW_INSECURE_API")
    for url in ("https://api.awork.com/api/v1", "http://127.0.0.1:8765/api/v1", "http://127.9.9.9/api",
                "http://localhost:8765/api/v1", "http://[::1]:8765/api/v1"):  # fmt: skip
        worker_env.setenv("AWORK_API_URL", url)
        assert WorkerSettings.from_env().api_url == url
    worker_env.setenv("AWORK_ALLOW_INSECURE_API", "perhaps")
    with pytest.raises(ConfigError, match="AWORK_ALLOW_INSECURE_API"):
        WorkerSettings.from_env()
    worker_env.delenv("AWORK_ALLOW_INSECURE_API")
    workspaces = tmp_path / "workspaces.toml"
    workspaces.write_text(
        '[workspaces.acme]\napi_key_env = "AWORK_API_KEY"\napi_url = "http://awork.example/api/v1"\n'
    )
    worker_env.setenv("AWORK_WORKSPACES_FILE", str(workspaces))
    worker_env.setenv("AWORK_API_URL", "https://api.awork.com/api/v1")
    with pytest.raises(ConfigError, match=r"workspaces\.acme\.api_url: http://"):
        WorkerSettings.from_env()


@pytest.mark.slow
def test_a_worker_with_an_http_api_url_does_not_start(rig: Rig) -> None:
    """#11.12: the worker stops at start (exit 2) with one line naming AWORK_API_URL, instead of
    consuming steps."""
    env = {**rig.env, "AWORK_API_KEY": "k", "AWORK_API_URL": "http://api.example.com/api/v1"}
    log = rig.root / "worker-http.log"
    child = Child("worker-http", worker_argv(1, f"http-{uuid.uuid4().hex[:6]}@x"), env, log).start()
    try:
        assert child.proc is not None
        assert child.proc.wait(timeout=60) == 2
    finally:
        child.stop(5)
    lines = [line for line in log.read_text().splitlines() if "AWORK_API_URL" in line]
    assert lines and "not starting" in lines[0] and "clear text" in lines[0], log.read_text()[-2000:]


# -- #11.12: the sandbox's own key, its secrets out of argv, compared in constant time ----------------
def call(method: str, url: str, token: str) -> int:
    """The status of a request with `Authorization: Bearer <token>`."""
    return requests.request(method, url, headers={"Authorization": f"Bearer {token}"}, timeout=10).status_code


def test_sandbox_has_its_own_key_variable_and_no_secret_in_argv(tmp_path: Path) -> None:
    """#11.12: the sandbox accepts AWORK_SANDBOX_API_KEY (never AWORK_API_KEY, the real key's
    variable) and gets its keys and admin token from the environment, not its command line."""
    from ops.sandbox.launcher import SandboxProcess

    real_key, sandbox_key, admin = (
        f"real-{uuid.uuid4().hex}",
        f"sb-{uuid.uuid4().hex}",
        f"adm-{uuid.uuid4().hex}",
    )
    env = {**os.environ, "AWORK_API_KEY": real_key}
    with SandboxProcess(api_keys={sandbox_key: "default"}, admin_token=admin, env=env) as sb:
        cmdline = Path(f"/proc/{sb.pid}/cmdline").read_bytes().decode(errors="replace")
        assert sandbox_key not in cmdline and admin not in cmdline
        url = f"{sb.api_url}/files/generateuploadurl"
        assert call("POST", url, sandbox_key) == 200
        assert call("POST", url, real_key) == 401
        stats = f"{sb.admin_url}/stats"
        assert call("GET", stats, admin) == 200
        assert call("GET", stats, admin + "x") == 401
    # without any sandbox key it makes one up and prints it under its own name
    env.pop("AWORK_SANDBOX_API_KEY", None)
    with SandboxProcess(api_keys={}, admin_token=admin, env=env) as sb:
        assert "AWORK_API_KEY" not in sb.values
        generated = sb.values["AWORK_SANDBOX_API_KEY"]
        assert generated != real_key
        url = f"{sb.api_url}/files/generateuploadurl"
        assert call("POST", url, generated) == 200
        assert call("POST", url, real_key) == 401


def test_sandbox_compares_its_secrets_in_constant_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """#11.12: the admin token and the API keys are checked with hmac.compare_digest (no `!=`,
    no dict lookup by the presented token); the checks still accept and refuse correctly."""
    import asyncio
    import hmac

    from aiohttp.test_utils import make_mocked_request

    from ops.sandbox.admin import AdminApi
    from ops.sandbox.app import ApiFrontDoor
    from ops.sandbox.core import Sandbox, SandboxConfig
    from ops.sandbox.settings import Settings

    seen: list[bytes] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        seen.extend([bytes(a), bytes(b)] if isinstance(a, bytes) else [a.encode(), b.encode()])
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    config = SandboxConfig(api_keys={"key-a": "a", "key-b": "b"}, admin_token="admin-t", data_dir=tmp_path)
    sandbox = Sandbox(config, Settings())
    admin, api = AdminApi(sandbox), ApiFrontDoor(sandbox)

    def status(handler: Any, path: str, token: str) -> int:
        request = make_mocked_request("GET", path, headers={"Authorization": f"Bearer {token}"})
        return int(asyncio.run(handler.handle(request, path)).status)

    assert status(admin, "/faults", "admin-t") == 200
    assert b"Bearer admin-t" in seen
    seen.clear()
    assert status(admin, "/faults", "admin-T") == 401
    assert b"Bearer admin-T" in seen
    seen.clear()
    assert status(api, "/no-such-route", "key-b") == 404  # past auth
    assert b"key-b" in seen and b"key-a" in seen  # every key compared, not a lookup
    seen.clear()
    assert status(api, "/no-such-route", "key-c") == 401
    assert b"key-c" in seen
