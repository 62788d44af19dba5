"""Flower: basic auth enforced for real, refusal without auth off loopback, secrets out of argv,
and task events with readable arguments (the helper the pipeline tests reuse)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from ops.flower import AUTH_ENV, FlowerProcess, check_auth, flower_argv, flower_env, is_loopback
from producers.config import ConfigError
from producers.contract import QUEUE_API, TASK_GENERATE_UPLOAD_URL

REPO = Path(__file__).resolve().parent.parent
PASSWORD = f"pw-{uuid.uuid4().hex}"
AUTH = f"operator:{PASSWORD}"


@pytest.fixture
def flower(redis_url: str, tmp_path: Path) -> Iterator[FlowerProcess]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "REDIS_URL": redis_url,
        # must never reach Flower: it would open the API without auth
        "FLOWER_UNAUTHENTICATED_API": "true",
    }
    process = FlowerProcess(
        env,
        basic_auth=AUTH,
        persistent_db=tmp_path / "flower.db",
        log_path=tmp_path / "flower.log",
    )
    process.start(timeout=60)
    yield process
    process.stop()


@pytest.mark.slow
def test_unauthenticated_requests_are_refused(flower: FlowerProcess) -> None:
    for path in ("/", "/tasks", "/api/tasks", "/api/workers"):
        response = flower.get(path, authenticated=False)
        assert response.status_code == 401, (path, response.status_code)
    wrong = requests.get(f"{flower.url}/api/tasks", auth=("operator", "wrong"), timeout=10)
    assert wrong.status_code == 401
    assert flower.get("/").status_code == 200
    assert flower.get("/api/tasks").json() == {}
    # /healthcheck answers without auth (it is how we know Flower is up) and says nothing else
    assert flower.get("/healthcheck", authenticated=False).text == "OK"


@pytest.mark.slow
def test_the_password_is_in_flowers_environment_not_its_command_line(flower: FlowerProcess) -> None:
    pid = flower.child.pid
    assert pid is not None
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    assert PASSWORD not in cmdline
    assert "flower" in cmdline
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert f"{AUTH_ENV}={AUTH}".encode() in environ
    assert not any(item.startswith(b"FLOWER_UNAUTHENTICATED_API=") for item in environ)


@pytest.mark.slow
def test_flower_shows_published_awork_tasks_with_readable_arguments(
    redis_url: str, flower: FlowerProcess, tmp_path: Path
) -> None:
    """No worker needed: `task_send_sent_event` makes every publish visible to Flower."""
    from producers.canvas import publisher_app

    job_id = uuid.uuid4().hex
    kwargs = {"job_id": job_id, "workspace": "default", "target": "task:abc", "file_name": "report.pdf"}
    app = publisher_app(redis_url)

    def seen(tasks: dict) -> bool:
        # events sent before Flower's consumer is bound are gone: publish until one is seen
        if not any(job_id in str(t.get("kwargs")) for t in tasks.values()):
            app.send_task(TASK_GENERATE_UPLOAD_URL, kwargs=kwargs, queue=QUEUE_API)
            return False
        return True

    try:
        tasks = flower.wait_for_tasks(seen, timeout=30)
    finally:
        app.close()
    ours = [t for t in tasks.values() if job_id in str(t.get("kwargs"))]
    assert ours and all(t["name"] == TASK_GENERATE_UPLOAD_URL for t in ours)
    shown = str(ours[0]["kwargs"])
    for value in kwargs.values():
        assert value in shown
    # --persistent-db: the history is saved when Flower stops
    flower.stop()
    assert list(tmp_path.glob("flower.db*"))


def test_refuses_to_start_without_auth_off_loopback() -> None:
    for address in ("0.0.0.0", "", "::", "10.1.2.3", "flower.internal"):
        with pytest.raises(ConfigError, match=AUTH_ENV):
            check_auth(None, address)
        with pytest.raises(ConfigError, match=AUTH_ENV):
            FlowerProcess({"REDIS_URL": "redis://127.0.0.1:1/0"}, address=address)
    for address in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert is_loopback(address)
        assert check_auth(None, address) is None
    assert check_auth("a:b,c:d", "0.0.0.0") == "a:b,c:d"
    for bad in ("justuser", ":pw", "user:", "a:b,nopass"):
        with pytest.raises(ConfigError, match=AUTH_ENV):
            check_auth(bad, "0.0.0.0")


def test_the_cli_refuses_with_one_line_naming_the_variable() -> None:
    env = {k: v for k, v in os.environ.items() if k != AUTH_ENV}
    env["REDIS_URL"] = "redis://127.0.0.1:1/0"
    result = subprocess.run(
        [sys.executable, "-m", "ops.cli", "flower", "--address", "0.0.0.0", "--port", "1"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    error_lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(error_lines) == 1, result.stderr
    assert AUTH_ENV in error_lines[0] and "0.0.0.0" in error_lines[0]


def test_argv_and_env_carry_no_secret() -> None:
    argv = flower_argv("0.0.0.0", 5555, Path("/data/flower.db"))
    assert "--persistent=True" in argv and "--db=/data/flower.db" in argv
    assert not any("auth" in a for a in argv)
    env = flower_env({"X": "1", "FLOWER_UNAUTHENTICATED_API": "1", AUTH_ENV: "old:pw"}, "new:pw")
    assert env[AUTH_ENV] == "new:pw" and "FLOWER_UNAUTHENTICATED_API" not in env and env["X"] == "1"
    assert AUTH_ENV not in flower_env({AUTH_ENV: "old:pw"}, None)


def test_flowerconfig_masks_credential_shaped_task_fields() -> None:
    import runpy
    from types import SimpleNamespace

    config = runpy.run_path(str(REPO / "ops" / "flowerconfig.py"))
    task = SimpleNamespace(args="('https://h/b?sig=SECRET',)", kwargs="{'job_id': 'j1'}", result=None)
    shown = config["format_task"](task)
    assert "SECRET" not in shown.args and "sig=***" in shown.args
    assert shown.kwargs == "{'job_id': 'j1'}"
    assert "args" in config["tasks_columns"] and "kwargs" in config["tasks_columns"]
