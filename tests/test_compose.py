"""compose.yaml and the Dockerfile, checked without a Docker engine: structure, services, key
settings, commands that our CLIs accept, and every environment variable compose sets is one
that something in the containers reads (our code, Celery/billiard/kombu, Flower)."""

from __future__ import annotations

import ast
import functools
import importlib
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "compose.yaml"
REDIS_START = REPO / "ops" / "redis-start.sh"
SECRETISH = re.compile(r"KEY|PASSWORD|AUTH|TOKEN|SECRET")
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
OUR_IMAGE = "awork-uploads:latest"
ENV_NAME = re.compile(r"^[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+$")
INTERPOLATION = re.compile(r"\$\{([A-Z_][A-Z0-9_]*)(?:(:?[-?])([^}]*))?\}")


# -- what the code reads ---------------------------------------------------------------------------
def _our_env_names() -> set[str]:
    """UPPER_SNAKE literals our modules that read the environment pass to a call, index with, or
    bind to a constant (os.environ.get("X"), env_int("X", ...), ENV_X = "X", env["X"])."""
    names: set[str] = set()
    for package in ("producers", "workers", "ops"):
        for path in (REPO / package).rglob("*.py"):
            source = path.read_text()
            if not any(w in source for w in ("environ", "getenv", "env_int(", "env_float(", "env_flag(")):
                continue
            for node in ast.walk(ast.parse(source)):
                candidates: list[ast.expr] = []
                if isinstance(node, ast.Call):
                    candidates += node.args
                elif isinstance(node, ast.Subscript):
                    candidates.append(node.slice)
                elif isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None:
                    candidates.append(node.value)
                for c in candidates:
                    if isinstance(c, ast.Constant) and isinstance(c.value, str) and ENV_NAME.match(c.value):
                        names.add(c.value)
    return names


_THIRD_PARTY_READ = re.compile(
    r"""(?:environ\.get|getenv|environ\.setdefault)\(\s*['"]([A-Z][A-Z0-9_]+)['"]|environ\[\s*['"]([A-Z][A-Z0-9_]+)['"]\s*\]"""
)


def _third_party_env_names() -> set[str]:
    """Variables Celery, billiard, kombu and Flower read, found in their installed sources, plus
    Flower's FLOWER_<OPTION> for every option it defines."""
    names: set[str] = set()
    for package in ("celery", "billiard", "kombu", "flower"):
        origin = importlib.import_module(package).__file__
        assert origin is not None, package
        for path in Path(origin).parent.rglob("*.py"):
            for match in _THIRD_PARTY_READ.finditer(path.read_text(errors="replace")):
                names.add(match.group(1) or match.group(2))
    from flower.options import options

    names |= {f"FLOWER_{name.upper().replace('-', '_')}" for name in options._options}
    return names


def _redis_env_names() -> set[str]:
    """What the redis service's processes read: ops/redis-start.sh, and redis-cli's REDISCLI_AUTH."""
    return set(re.findall(r"\$\{?([A-Z][A-Z0-9_]+)", REDIS_START.read_text())) | {"REDISCLI_AUTH"}


@functools.cache
def env_names_read() -> frozenset[str]:
    return frozenset(_our_env_names() | _third_party_env_names() | _redis_env_names())


def interpolate(value: str, fill: str = "x") -> str:
    """What compose would substitute, with every variable set to `fill` ($$ is a literal $)."""
    return re.sub(r"\$\$|" + INTERPOLATION.pattern, lambda m: "$" if m.group(0) == "$$" else fill, value)


# -- the files ---------------------------------------------------------------------------------------
@functools.cache
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def service(name: str) -> dict[str, Any]:
    svc = compose()["services"][name]
    assert isinstance(svc, dict)
    return svc


def command(name: str) -> list[str]:
    cmd = service(name)["command"]
    return [interpolate(str(c)) for c in (shlex.split(cmd) if isinstance(cmd, str) else cmd)]


def environment(name: str) -> dict[str, str]:
    env = service(name).get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def seconds(duration: str) -> float:
    total = 0.0
    for amount, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration):
        total += float(amount) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    return total


def volume_mounts(name: str) -> dict[str, str]:
    """container path -> source, for short-syntax volumes."""
    mounts = {}
    for item in service(name).get("volumes", []):
        source, target = str(item).split(":")[:2]
        mounts[target] = source
    return mounts


# -- tests -------------------------------------------------------------------------------------------
def test_compose_has_the_services_and_named_volumes() -> None:
    services = compose()["services"]
    assert {"redis", "worker", "flower", "sandbox"} <= set(services)
    assert {"redis-data", "staging", "flower-data"} <= set(compose()["volumes"])
    for name, svc in services.items():
        assert "container_name" not in svc, f"{name}: a fixed name stops --scale"
        redis_image = str(svc.get("entrypoint", [""])[-1]).endswith(("/redis-start.sh", "/sentinel-start.sh"))
        if name != "redis" and not redis_image:
            assert svc.get("image") == OUR_IMAGE and svc.get("build") == ".", name


def test_redis_is_a_durable_password_protected_broker() -> None:
    redis = service("redis")
    assert re.fullmatch(r"redis:7(\.\d+)*(-[a-z]+)?", redis["image"])
    raw = [str(c) for c in redis["command"]]
    args = " ".join(raw)
    assert "--appendonly yes" in args
    assert "--appendfsync always" in args
    assert "--maxmemory-policy noeviction" in args
    # the password: from the environment, into a file by ops/redis-start.sh, never in argv
    assert "--requirepass" not in raw
    env = environment("redis")
    for var in ("REDIS_PASSWORD", "REDISCLI_AUTH"):
        match = INTERPOLATION.fullmatch(env[var])
        assert match and match.group(1) == "REDIS_PASSWORD" and match.group(2) == ":?", var
    entrypoint = [str(c) for c in redis["entrypoint"]]
    script = entrypoint[-1]
    assert volume_mounts("redis")[script] == "./ops/redis-start.sh"
    assert "/run/redis-secret" in redis["tmpfs"], "the password file lives in memory only"
    assert "/data" in volume_mounts("redis") and volume_mounts("redis")["/data"] == "redis-data"
    assert "ports" not in redis, "the broker is not published on the host"
    assert "healthcheck" in redis and "ping" in str(redis["healthcheck"]["test"])


def test_worker_is_scalable_serves_both_queues_and_shuts_down_softly() -> None:
    from ops.cli import build_parser
    from producers.broker import celery_config
    from producers.contract import QUEUE_API, QUEUE_CALLBACKS, QUEUE_TRANSFER

    worker = service("worker")
    args = build_parser().parse_args(command("worker"))
    assert args.command == "worker"
    assert set(args.queues.split(",")) == {QUEUE_API, QUEUE_TRANSFER, QUEUE_CALLBACKS}
    assert "ports" not in worker, "fixed host ports stop --scale"
    assert worker["stop_signal"] == "SIGTERM"
    env = environment("worker")
    # A plain SIGTERM: our shutdown watchdog bounds it (REMAP_SIGTERM would make every stop
    # wait out the whole grace, see workers/shutdown.py).
    assert "REMAP_SIGTERM" not in env
    grace = float(env["AWORK_SHUTDOWN_GRACE"])
    assert float(celery_config("redis://").get("worker_soft_shutdown_timeout", 0.0)) > 0
    assert seconds(worker["stop_grace_period"]) > grace + 10, "the grace must end before SIGKILL"
    assert str(env["WORKER_METRICS_PORT"]) in [str(p) for p in worker["expose"]]
    assert volume_mounts("worker")[env["STAGING_DIR"]] == "staging"
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"


def test_flower_requires_auth_and_keeps_state_on_a_volume() -> None:
    from ops.flower import build_parser, is_loopback

    args = build_parser().parse_args(command("flower")[1:])
    assert command("flower")[0] == "flower"
    assert not is_loopback(args.address), "reachable from the host port, so auth is mandatory"
    auth = environment("flower")["FLOWER_BASIC_AUTH"]
    match = INTERPOLATION.fullmatch(auth)
    assert match and match.group(2) == ":?", "FLOWER_BASIC_AUTH must be required, not defaulted"
    db = str(args.persistent_db)
    mounts = volume_mounts("flower")
    assert any(db.startswith(target + "/") and source == "flower-data" for target, source in mounts.items())
    for port in service("flower").get("ports", []):
        assert str(port).startswith("127.0.0.1:"), "Flower is published on the host's loopback only"


def test_api_is_published_on_loopback_with_a_readiness_check() -> None:
    from producers.intake.server import build_parser

    api = service("api")
    assert command("api")[0] == "api"
    args = build_parser().parse_args(command("api")[1:])
    assert args.host == "0.0.0.0" and args.port == 8780
    assert [str(p) for p in api["ports"]] == ["127.0.0.1:8780:8780"]
    assert "/readyz" in str(api["healthcheck"]["test"])
    env = environment("api")
    assert volume_mounts("api")[env["STAGING_DIR"]] == "staging"
    assert not any("KEY" in name for name in env), "the intake holds no API key and no secrets key"


def test_sandbox_listens_on_all_interfaces_for_a_local_trial() -> None:
    from ops.sandbox.cli import KEYS_ENV, build_parser

    cmd = command("sandbox")
    assert cmd[0] == "sandbox"
    args = build_parser().parse_args(cmd[1:])
    assert args.host == "0.0.0.0"
    assert args.public_host == "sandbox"
    assert service("sandbox").get("profiles"), "a trial tool: not started by a plain `up`"
    # #11.12: its own key variable, through the environment; the real key's variable never
    assert not args.api_key
    assert INTERPOLATION.fullmatch(environment("sandbox")[KEYS_ENV]).group(1) == KEYS_ENV  # type: ignore[union-attr]
    assert "AWORK_API_KEY" not in str(service("sandbox"))


def test_no_secret_in_any_command_entrypoint_or_healthcheck() -> None:
    """#11.12: argv and healthcheck commands show in `ps` and `docker inspect`: secrets go
    through the environment only."""
    for name, svc in compose()["services"].items():
        parts = [svc.get("command"), svc.get("entrypoint"), (svc.get("healthcheck") or {}).get("test")]
        for part in parts:
            for var in INTERPOLATION.findall(str(part or "")):
                assert not SECRETISH.search(var[0]), f"{name}: ${{{var[0]}}} in a command line"
            flags = r"(^|\s)-a\s|--requirepass|--api-key|--admin-token|--basic-auth"
            assert not re.search(flags, str(part or "")), name


def test_workers_check_source_hosts_too() -> None:
    """#11.12: workers re-check a URL source's host against AWORK_SOURCE_URL_HOSTS, so they get it."""
    worker, producer = environment("worker"), environment("producer")
    assert worker["AWORK_SOURCE_URL_HOSTS"] == producer["AWORK_SOURCE_URL_HOSTS"]
    # opt-ins are off unless the operator sets them
    for name, var in (("worker", "AWORK_ALLOW_INSECURE_API"), ("flower", "AWORK_FLOWER_CONTROL")):
        match = INTERPOLATION.fullmatch(environment(name)[var])
        assert match and match.group(1) == var and not match.group(3), (name, var)


@pytest.mark.slow
def test_redis_start_script_keeps_the_password_out_of_argv(tmp_path: Path) -> None:
    """#11.12: ops/redis-start.sh for real, with this machine's redis-server on a free port (the
    image's docker-entrypoint.sh, which only drops root, stands in as `exec "$@"`)."""
    import os
    import time

    import redis as redis_py

    from ops.redis_server import find_redis_server, free_port

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "docker-entrypoint.sh"
    shim.write_text('#!/bin/sh\nexec "$@"\n')
    shim.chmod(0o755)
    password, port = os.urandom(12).hex(), free_port()
    env = {
        "PATH": f"{bin_dir}:{Path(find_redis_server()).parent}:/usr/bin:/bin",
        "REDIS_PASSWORD": password,
        "REDISCLI_AUTH": password,
        "REDIS_SECRET_DIR": str(tmp_path / "secret"),
    }
    argv = ["/bin/sh", str(REDIS_START), "redis-server", "--port", str(port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", str(tmp_path)]  # fmt: skip
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = redis_py.Redis(port=port, password=password, socket_timeout=2)
        for _ in range(100):
            assert proc.poll() is None, "redis-start.sh exited"
            try:
                assert client.ping()
                break
            except redis_py.ConnectionError:
                time.sleep(0.05)
        with pytest.raises(redis_py.AuthenticationError):
            redis_py.Redis(port=port, socket_timeout=2).ping()
        assert password not in Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode()
        assert password.encode() not in Path(f"/proc/{proc.pid}/environ").read_bytes()
        conf = tmp_path / "secret" / "redis.conf"
        assert conf.stat().st_mode & 0o777 == 0o600 and (tmp_path / "secret").stat().st_mode & 0o777 == 0o700
        client.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    bad = subprocess.run(argv, env={**env, "REDIS_PASSWORD": "with space"}, capture_output=True, text=True)
    assert bad.returncode == 2 and "REDIS_PASSWORD" in bad.stderr


def test_producers_share_the_staging_volume_and_hold_no_key() -> None:
    from ops.cli import build_parser

    build_parser().parse_args(command("producer"))
    env = environment("producer")
    assert volume_mounts("producer")[env["STAGING_DIR"]] == "staging"
    assert not any("KEY" in name for name in env)


def test_every_environment_variable_compose_sets_is_read_by_the_code() -> None:
    known = env_names_read()
    # the scan finds what it should, and not everything
    assert {"REDIS_URL", "STAGING_DIR", "AWORK_API_KEY", "AWORK_UPLOAD_HOSTS", "WORKER_METRICS_PORT",
            "AWORK_LOG_FORMAT", "FLOWER_BASIC_AUTH", "AWORK_SHUTDOWN_GRACE"} <= known  # fmt: skip
    assert "AWORK_API_TOKEN" not in known and "WORKER_METRICS" not in known
    unread = {
        f"{name}: {var}" for name in compose()["services"] for var in environment(name) if var not in known
    }
    assert not unread, f"set in compose.yaml but read by nothing: {sorted(unread)}"


def test_secrets_in_compose_come_only_from_the_environment() -> None:
    """Every secret-named variable is a ${...} interpolation, every password in a URL is one, and
    no interpolated secret has a non-empty default. The scans must find the secrets compose.yaml
    does hold: a scan that found none would check nothing."""
    values = {
        (name, var): value for name in compose()["services"] for var, value in environment(name).items()
    }
    secrets = {key: value for key, value in values.items() if SECRETISH.search(key[1])}
    url_users = {
        key: value.split("://", 1)[1].split("@", 1)[0]
        for key, value in values.items()
        if "://" in value and "@" in value
    }
    secret_refs = [
        (key, match)
        for key, value in values.items()
        for match in INTERPOLATION.finditer(value)
        if SECRETISH.search(match.group(1))
    ]
    held = {("redis", "REDIS_PASSWORD"), ("worker", "AWORK_API_KEY"), ("flower", "FLOWER_BASIC_AUTH")}
    assert held <= set(secrets)
    assert {("worker", "REDIS_URL"), ("flower", "REDIS_URL"), ("api", "REDIS_URL")} <= set(url_users)
    assert {var for _, var in held} <= {match.group(1) for _, match in secret_refs}
    for (name, var), value in secrets.items():
        assert INTERPOLATION.fullmatch(value), f"{name}.{var} must be ${{...}}, not a literal"
    for (name, var), userinfo in url_users.items():
        assert INTERPOLATION.search(userinfo), f"{name}.{var}: a literal password in a URL"
    for (name, var), match in secret_refs:
        assert match.group(2) != ":-" or not match.group(3), f"{name}.{var}: a default secret"


# -- the Dockerfile ----------------------------------------------------------------------------------
def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def test_dockerfile_installs_the_project_as_a_non_root_user() -> None:
    instructions = dockerfile_instructions()
    froms = [rest for kw, rest in instructions if kw == "FROM"]
    assert froms and all(f.split()[0] == "python:3.11-slim" for f in froms)
    final = max(i for i, (kw, _) in enumerate(instructions) if kw == "FROM")
    build_copies = " ".join(rest for kw, rest in instructions[:final] if kw == "COPY")
    for needed in ("pyproject.toml", "README.md", "producers", "workers", "ops"):
        assert needed in build_copies, f"the build stage does not copy {needed}"
    installs = re.compile(r"pip install\b.*\s\"?\.(\[(?P<extras>[a-z,]+)\])?\"?(\s|$)")
    found = [m for kw, rest in instructions if kw == "RUN" and (m := installs.search(rest))]
    assert found, "the build stage does not pip install the project"
    extras = set((found[-1].group("extras") or "").split(","))
    # The image runs workers, the HTTP API, Flower and the sandbox (compose.yaml).
    for needed in ("worker", "api", "ops"):
        assert needed in extras or "all" in extras, f"the image lacks the `{needed}` extra"
    users = [(i, rest) for i, (kw, rest) in enumerate(instructions) if kw == "USER"]
    assert users, "no USER: the image would run as root"
    last_user_at, user = users[-1]
    assert user not in ("root", "0") and not user.startswith("0:")
    last_run_at = max(i for i, (kw, _) in enumerate(instructions) if kw == "RUN")
    assert last_user_at > last_run_at
    entrypoint = [rest for kw, rest in instructions if kw == "ENTRYPOINT"]
    assert entrypoint and entrypoint[-1].startswith("[") and '"awork-uploads"' in entrypoint[-1]


def test_dockerfile_copies_every_package_pyproject_ships() -> None:
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    include = project["tool"]["setuptools"]["packages"]["find"]["include"]
    copied = " ".join(rest for kw, rest in dockerfile_instructions() if kw == "COPY")
    for pattern in include:
        assert pattern.rstrip("*") in copied


def test_dockerfile_env_is_read_by_python_or_the_code() -> None:
    help_env = subprocess.run([sys.executable, "--help-env"], capture_output=True, text=True).stdout
    python_vars = set(re.findall(r"^(PYTHON[A-Z_]+)", help_env, flags=re.M))
    assert "PYTHONUNBUFFERED" in python_vars
    for kw, rest in dockerfile_instructions():
        if kw != "ENV":
            continue
        for name in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", rest):
            assert name == "PATH" or name in python_vars or name in env_names_read(), name


def test_dockerignore_keeps_secrets_and_local_state_out_of_the_image() -> None:
    patterns = {line.strip().rstrip("/") for line in DOCKERIGNORE.read_text().splitlines()}
    for needed in (".env", ".git", ".venv", "var", "node_modules"):
        assert needed in patterns, needed


@pytest.mark.parametrize(
    "text, expected", [("${A}", "x"), ("a${B:-d}b", "axb"), ("$${HOSTNAME}", "${HOSTNAME}")]
)
def test_interpolate_helper(text: str, expected: str) -> None:
    assert interpolate(text) == expected
