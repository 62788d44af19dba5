"""REDIS_URL=sentinel://...: configuration, the Celery settings it gives, and a client that
keeps working through a real failover (master + replica + 3 sentinels on loopback)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from ops.redis_ha import RedisHA
from ops.redis_server import new_password
from producers.broker import celery_config
from producers.config import ConfigError, SharedSettings, redact_url
from producers.messages import fast_path_supported
from producers.redis_conn import (
    async_redis_client,
    check_redis_url,
    failover_retry,
    redis_client,
    sentinel_target,
)

REPO = Path(__file__).resolve().parent.parent
URL = "sentinel://:mpw@10.0.0.1:26379/2;sentinel://10.0.0.2;sentinel://10.0.0.3:26380"


@pytest.fixture
def sentinel_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_SENTINEL_MASTER", "mymaster")
    monkeypatch.setenv("REDIS_SENTINEL_PASSWORD", "spw")


def test_sentinel_url_parsed_in_celery_form(sentinel_env: None) -> None:
    target = sentinel_target(URL)
    assert target.sentinels == (("10.0.0.1", 26379), ("10.0.0.2", 26379), ("10.0.0.3", 26380))
    assert (target.master, target.db) == ("mymaster", 2)
    assert (target.password, target.sentinel_password) == ("mpw", "spw")
    assert "mpw" not in repr(target) and "spw" not in repr(target)


def test_celery_config_gets_kombu_sentinel_options(sentinel_env: None) -> None:
    conf = celery_config(URL)
    assert conf["broker_url"] == URL
    options = conf["broker_transport_options"]
    assert options["master_name"] == "mymaster"
    assert options["sentinel_kwargs"] == {"password": "spw"}
    assert options["visibility_timeout"] > 0  # the Redis transport's options stay
    assert "master_name" not in celery_config("redis://127.0.0.1:6379/0")["broker_transport_options"]
    assert fast_path_supported(URL)


def test_redact_every_part() -> None:
    assert redact_url(URL) == "sentinel://:***@10.0.0.1:26379/2;sentinel://10.0.0.2;sentinel://10.0.0.3:26380"


@pytest.mark.parametrize(
    ("url", "env", "names"),
    [
        (URL, {}, "REDIS_SENTINEL_MASTER"),
        ("sentinel://h:1;redis://h:2", {"REDIS_SENTINEL_MASTER": "m"}, "REDIS_URL"),
        ("sentinel://h:notaport", {"REDIS_SENTINEL_MASTER": "m"}, "REDIS_URL"),
        ("sentinel://h:1/x", {"REDIS_SENTINEL_MASTER": "m"}, "REDIS_URL"),
        ("http://h:1", {}, "REDIS_URL"),
    ],
)
def test_bad_configuration_names_the_variable(url: str, env: dict[str, str], names: str) -> None:
    with pytest.raises(ConfigError) as err:
        check_redis_url(url, env)
    assert str(err.value).startswith(names + ":")
    assert "mpw" not in str(err.value)


def test_shared_settings_accept_sentinel(monkeypatch: pytest.MonkeyPatch, sentinel_env: None) -> None:
    monkeypatch.setenv("REDIS_URL", URL)
    assert SharedSettings.from_env().redis_url == URL
    monkeypatch.delenv("REDIS_SENTINEL_MASTER")
    with pytest.raises(ConfigError, match=r"^REDIS_SENTINEL_MASTER:"):
        SharedSettings.from_env()


def test_generated_redis_passwords_are_never_read_as_an_option() -> None:
    """redis-server takes a command-line argument starting with "--" for the next option: a
    token_urlsafe password did that one time in 4,096 and the HA test's master did not start
    (CI). The local fleet and RedisHA draw theirs from new_password()."""
    drawn = [new_password() for _ in range(3000)] + [RedisHA(Path("unused")).password or ""]
    assert not [p for p in drawn if p.startswith("-")]


def test_failover_retry_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWORK_REDIS_FAILOVER_SECONDS", "5")
    short = failover_retry().get_retries()
    monkeypatch.setenv("AWORK_REDIS_FAILOVER_SECONDS", "20")
    long = failover_retry().get_retries()
    assert 0 < short < long < 60


@pytest.fixture(scope="module")
def ha(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisHA]:
    with RedisHA(tmp_path_factory.mktemp("ha")) as cluster:
        yield cluster


@pytest.mark.slow  # a real master, replica and sentinels (make test, not test-fast)
@pytest.mark.timing
def test_clients_follow_the_master_through_a_failover(ha: RedisHA, monkeypatch: pytest.MonkeyPatch) -> None:
    """Writes before, during and after a master SIGKILL: the client finds the promoted replica
    by itself, and a command issued while no master is up waits (bounded) instead of failing."""
    monkeypatch.setenv("REDIS_SENTINEL_MASTER", ha.master_name)
    assert ha.sentinel_password is not None
    monkeypatch.setenv("REDIS_SENTINEL_PASSWORD", ha.sentinel_password)
    client = redis_client(ha.url, socket_timeout=2, socket_connect_timeout=1, decode_responses=True)
    client.set("before", "1")
    client.wait(1, 2000)  # on the replica too: async replication, made sure for the test
    old = ha.kill_master()
    started = time.monotonic()
    client.incr("during")  # issued with no master: retried until the replica is promoted
    took = time.monotonic() - started
    new = ha.wait_failover(old)
    assert new != old
    assert client.get("before") == "1" and client.get("during") == "1"
    assert client.connection_pool.get_master_address()[1] == new  # type: ignore[attr-defined]
    assert took < 15, f"the first write after the kill took {took:.1f} s"

    async def read() -> str | None:
        aclient = async_redis_client(ha.url, socket_timeout=2, decode_responses=True)
        try:
            return await aclient.get("during")
        finally:
            await aclient.aclose()

    assert asyncio.run(read()) == "1"


@pytest.mark.slow  # a real master, replica and sentinels (make test, not test-fast)
@pytest.mark.timing
def test_a_command_in_flight_at_the_kill_goes_to_the_promoted_master(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A command whose connection drops mid-way is sent again on a connection to the *new*
    master: redis-py alone reconnects that connection to the dead master's address for the
    whole retry budget (producers.redis_conn.FailoverConnection)."""
    import threading

    with RedisHA(tmp_path / "ha") as cluster:
        assert cluster.sentinel_password is not None
        monkeypatch.setenv("REDIS_SENTINEL_MASTER", cluster.master_name)
        monkeypatch.setenv("REDIS_SENTINEL_PASSWORD", cluster.sentinel_password)
        monkeypatch.setenv("AWORK_REDIS_FAILOVER_SECONDS", "10")
        client = redis_client(cluster.url, socket_timeout=5, socket_connect_timeout=1)
        client.ping()
        outcome: list[object] = []

        def blocked() -> None:
            try:
                outcome.append(client.blpop(["nothing"], 2))
            except redis.RedisError as exc:
                outcome.append(exc)

        thread = threading.Thread(target=blocked)
        started = time.monotonic()
        thread.start()
        time.sleep(0.3)  # BLPOP is waiting on the master
        old = cluster.kill_master()
        thread.join(30)
        took = time.monotonic() - started
        assert outcome == [None], outcome  # BLPOP timed out normally, on the new master
        assert cluster.master_port() != old
        assert took < 9, f"{took:.1f} s: the retry kept dialling the dead master"
        client.close()


@pytest.mark.slow  # a real master, replica and sentinels (make test, not test-fast)
@pytest.mark.timing
def test_wrong_sentinel_password_is_an_error_not_a_hang(ha: RedisHA, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_SENTINEL_MASTER", ha.master_name)
    monkeypatch.setenv("REDIS_SENTINEL_PASSWORD", "wrong")
    monkeypatch.setenv("AWORK_REDIS_FAILOVER_SECONDS", "1")
    started = time.monotonic()
    with pytest.raises(redis.RedisError):
        redis_client(ha.url, socket_timeout=1, socket_connect_timeout=1).ping()
    assert time.monotonic() - started < 10


@pytest.mark.slow  # a real master, replica and sentinels (make test, not test-fast)
def test_ha_files_stay_private(ha: RedisHA) -> None:
    """The sentinels' configs hold the passwords (and sentinels rewrite them): private folders."""
    folders = [p for p in Path(ha.root).iterdir() if p.is_dir()]
    assert len(folders) == 5
    for folder in folders:
        assert folder.stat().st_mode & 0o077 == 0, folder


def test_compose_ha_profile_has_the_same_shape() -> None:
    """compose's `ha` profile: the `redis` master, one replica of it, three sentinels, and every
    app service's REDIS_URL switchable to the sentinels (AWORK_REDIS_URL)."""
    import yaml

    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    services = compose["services"]
    ha = {name for name, svc in services.items() if "ha" in (svc.get("profiles") or [])}
    assert ha == {"redis-replica", "sentinel-1", "sentinel-2", "sentinel-3"}
    replica = " ".join(str(c) for c in services["redis-replica"]["command"])
    assert "--replicaof redis 6379" in replica and "--appendonly yes" in replica
    volumes = set()
    for n in (1, 2, 3):
        sentinel = services[f"sentinel-{n}"]
        assert sentinel["entrypoint"][-1].endswith("/sentinel-start.sh")
        volumes |= {v.split(":")[0] for v in sentinel["volumes"] if v.endswith(":/data")}
    assert len(volumes) == 3, "each sentinel keeps its own config"
    for name in ("worker", "flower", "api", "producer"):
        env = services[name]["environment"]
        assert env["REDIS_URL"].startswith("${AWORK_REDIS_URL:-redis://"), name
        assert {"REDIS_SENTINEL_MASTER", "REDIS_SENTINEL_PASSWORD"} <= set(env), name


@pytest.mark.slow  # a real master, replica and sentinels (make test, not test-fast)
def test_sentinel_start_script_runs_a_sentinel_without_secrets_in_argv(tmp_path: Path) -> None:
    """ops/sentinel-start.sh for real (docker-entrypoint.sh shimmed as `exec "$@"`) against a
    password-protected redis-server on a free port: the sentinel watches it, its config is
    private, no password is in its command line or environment."""
    import os
    import subprocess

    from ops.redis_server import RedisServer, find_redis_server, free_port

    shim = tmp_path / "bin" / "docker-entrypoint.sh"
    shim.parent.mkdir()
    shim.write_text('#!/bin/sh\nexec "$@"\n')
    shim.chmod(0o755)
    password, sentinel_password, port = os.urandom(8).hex(), os.urandom(8).hex(), free_port()
    with RedisServer(tmp_path / "master", password=password, appendonly=False) as master:
        env = {
            "PATH": f"{shim.parent}:{Path(find_redis_server()).parent}:/usr/bin:/bin",
            "REDIS_PASSWORD": password,
            "REDIS_SENTINEL_PASSWORD": sentinel_password,
            "SENTINEL_DIR": str(tmp_path / "sentinel"),
            "SENTINEL_PORT": str(port),
            "SENTINEL_MASTER_HOST": "127.0.0.1",
            "SENTINEL_MASTER_PORT": str(master.port),
        }
        script = REPO / "ops" / "sentinel-start.sh"
        proc = subprocess.Popen(["/bin/sh", str(script)], env=env, stdout=subprocess.DEVNULL)
        try:
            client = redis.Redis(
                port=port, password=sentinel_password, socket_timeout=1, decode_responses=True
            )
            deadline = time.monotonic() + 15
            while True:
                assert proc.poll() is None, "sentinel-start.sh exited"
                try:
                    state = client.sentinel_master("mymaster")
                    if state.get("flags") == "master" or state.get("is_master"):
                        break
                except redis.RedisError:
                    pass
                assert time.monotonic() < deadline, "the sentinel does not see its master"
                time.sleep(0.1)
            assert int(state["port"]) == master.port
            for secret in (password, sentinel_password):
                assert secret not in Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode()
                assert secret.encode() not in Path(f"/proc/{proc.pid}/environ").read_bytes()
            conf = tmp_path / "sentinel" / "sentinel.conf"
            assert conf.stat().st_mode & 0o777 == 0o600
            client.close()
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    bad = subprocess.run(["/bin/sh", str(script)], env={**env, "REDIS_PASSWORD": "a b"}, capture_output=True)
    assert bad.returncode == 2 and b"REDIS_PASSWORD" in bad.stderr


@pytest.mark.slow
def test_stack_ha_runs_the_fleet_on_sentinel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`awork-uploads stack --ha`: the workers and other shells (stack.env) get the sentinel
    settings; stop leaves none of the five Redis processes behind."""
    from ops.stack import Stack, config_from_args, parse_args

    for name in ("REDIS_URL", "REDIS_SENTINEL_MASTER", "REDIS_SENTINEL_PASSWORD", "AWORK_API_URL"):
        monkeypatch.delenv(name, raising=False)
    args = parse_args(["--ha", "--workers", "1", "--no-flower", "--data-dir", str(tmp_path)])
    stack = Stack(config_from_args(args))
    try:
        stack.start()
        stack.wait_ready()
        assert stack.describe()["redis_ha"] is True
        assert "***" in stack.describe()["redis"]
        env_file = dict(line.split("=", 1) for line in (tmp_path / "stack.env").read_text().splitlines())
        assert env_file["REDIS_URL"].startswith("sentinel://")
        assert env_file["REDIS_SENTINEL_MASTER"] == "mymaster"
        client = redis_client(env_file["REDIS_URL"], socket_timeout=2)
        assert client.ping()
        client.close()
        nodes = [*stack.ha.nodes, *stack.ha.sentinels]
    finally:
        stack.stop()
    assert not (tmp_path / "stack.env").exists()
    assert len(nodes) == 5 and not any(n.alive() for n in nodes)
