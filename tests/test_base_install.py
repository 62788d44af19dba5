"""What a producer installs: `pip install awork-uploads` without extras enqueues, and carries none of
the operator or worker dependencies (Flower, aiohttp, prometheus-client, requests-toolbelt).

Also: the worker modules import with an empty environment (settings are read when a worker
starts), and the entry point loads no operator code for a producer command.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ops.redis_server import RedisServer
from producers.client import Uploads
from producers.config import SharedSettings

REPO = Path(__file__).resolve().parent.parent
# The extras' packages a producer must not need (import names).
NOT_IN_BASE = ("flower", "aiohttp", "prometheus_client", "requests_toolbelt")
OPERATOR_CODE = ("flower", "aiohttp", "tornado", "ops.sandbox", "ops.flower", "ops.stack", "workers")

PRODUCER_SCRIPT = """
import importlib.util, json, sys
from pathlib import Path
from producers import JobSpec, Uploads

with Uploads.from_env() as up:
    job = up.enqueue(Path(sys.argv[1]), to=sys.argv[2])
forbidden = json.loads(sys.argv[3])
print(json.dumps({
    "id": job.id,
    "state": job.state.value,
    "imported": sorted(m for m in sys.modules if m.split(".")[0] in forbidden),
    "installed": sorted(name for name in forbidden if importlib.util.find_spec(name) is not None),
}))
"""


def _run(
    argv: list[str], env: dict[str, str], cwd: Path, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def base_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the package installed from this checkout, no extras. A copy of the
    sources is built, so the build leaves nothing in the checkout; pip's cache keeps it quick."""
    root = tmp_path_factory.mktemp("base-install")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for package in ("producers", "workers", "ops"):
        shutil.copytree(REPO / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    done = subprocess.run([*pip, str(src)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return venv


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis", appendonly=False).start()
    yield server
    server.stop()


@pytest.mark.slow
def test_the_base_install_enqueues_without_the_extras(
    base_venv: Path, own_redis: RedisServer, tmp_path: Path
) -> None:
    """Marked slow: building the venv takes ~50 s (pip, from its cache or PyPI)."""
    staging = tmp_path / "staging"
    staging.mkdir()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "REDIS_URL": own_redis.url,
        "STAGING_DIR": str(staging),
    }
    src = tmp_path / "report.pdf"
    src.write_bytes(b"%PDF-1.7 base install")
    target = f"task:{uuid.uuid4()}"

    for name in NOT_IN_BASE:
        probe = _run([str(base_venv / "bin" / "python"), "-c", f"import {name}"], env, tmp_path)
        assert probe.returncode != 0, f"{name} is importable in the base install"

    cli = _run(
        [str(base_venv / "bin" / "awork-uploads"), "enqueue", str(src), "--to", target, "--json"],
        env,
        tmp_path,
    )
    assert cli.returncode == 0, cli.stderr[-3000:]
    from_cli = json.loads(cli.stdout.splitlines()[-1])
    assert from_cli["state"] == "queued"

    script = [
        str(base_venv / "bin" / "python"),
        "-c",
        PRODUCER_SCRIPT,
        str(src),
        target,
        json.dumps(NOT_IN_BASE),
    ]
    api = _run(script, env, tmp_path)
    assert api.returncode == 0, api.stderr[-3000:]
    report = json.loads(api.stdout.splitlines()[-1])
    assert report["state"] == "queued"
    assert report["imported"] == [] and report["installed"] == []

    # Both jobs are in Redis, published for the workers.
    up = Uploads(SharedSettings(own_redis.url, staging, None, 3600, ()))
    try:
        for job_id in (from_cli["id"], report["id"]):
            record = up.store.get(job_id)
            assert record is not None and record["published"] == "1"
    finally:
        up.close()


EVERY_MODULE = """
import importlib, pkgutil
import producers, workers
for package in (producers, workers):
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        importlib.import_module(info.name)
import workers.celery_app
print(workers.app.main)
"""


def test_every_module_imports_with_an_empty_environment(tmp_path: Path) -> None:
    """No setting is read at import: the Celery app, the steps and the rest import without REDIS_URL
    (a worker reads its settings when it starts)."""
    done = _run([sys.executable, "-c", EVERY_MODULE], {}, tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "workers"


def test_a_producer_command_loads_no_operator_code(tmp_path: Path) -> None:
    """`awork-uploads enqueue --help` imports neither Flower, aiohttp, the sandbox nor the workers."""
    code = (
        "import json, sys\n"
        "from ops.cli import main\n"
        "try:\n    main(['enqueue', '--help'])\n"
        "except SystemExit as exc:\n    assert exc.code == 0, exc.code\n"
        f"prefixes = {OPERATOR_CODE!r}\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith(prefixes))))\n"
    )
    done = _run([sys.executable, "-c", code], {}, tmp_path, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "--idempotency-key" in done.stdout
    assert json.loads(done.stdout.splitlines()[-1]) == []
