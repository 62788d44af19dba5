"""Shared fixtures: a private redis-server per session (never the machine's Redis on 6379), and a
private vhost on the machine's RabbitMQ per test module (deleted afterwards)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from ops.rabbitmq import RabbitUnavailable, Vhost
from ops.redis_server import RedisServer

# `make test-fast` runs `pytest -m "not slow"`. A test that starts worker processes (a `fleet`
# fixture) or Azurite is slow wherever it lives, whether its module marks it or not.
SLOW_FIXTURES = frozenset({"fleet", "azurite"})


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    # Files with slow tests first: pytest-xdist (make test) hands out whole files in this order, so
    # the long ones start early and the short ones fill the gaps at the end. The sort is stable,
    # so a file's tests stay together and in their order.
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"), appendonly=False).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def vhost() -> Iterator[Vhost]:
    """A vhost of the module's own on 127.0.0.1:5672 (guest); skips where there is no RabbitMQ."""
    try:
        v = Vhost().create()
    except RabbitUnavailable as exc:
        pytest.skip(str(exc))
    yield v
    v.delete()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """A clean database on the private server for each test."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    yield redis_server.url


@pytest.fixture
def staging_dir(tmp_path: Path) -> Path:
    path = tmp_path / "staging"
    path.mkdir()
    return path


@pytest.fixture
def producer_env(monkeypatch: pytest.MonkeyPatch, redis_url: str, staging_dir: Path) -> dict[str, str]:
    env = {"REDIS_URL": redis_url, "STAGING_DIR": str(staging_dir)}
    for key in ("AWORK_WORKSPACES_FILE", "AWORK_SOURCE_URL_HOSTS", "AWORK_API_URL", "AWORK_API_KEY"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env
