"""The connection registry against a real redis-server: encryption at rest, rekey, the CLI,
enqueue to unknown/removed connections, the worker-side cache."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import redis
from cryptography.fernet import Fernet

from ops.cli import main as cli_main
from producers.client import Uploads
from producers.connections import CONNECTIONS_KEY, ConnectionRegistry, connection_key
from producers.contract import JobState, SpecError
from workers.connections.crypto import SecretBox
from workers.connections.store import ConnectionStore
from workers.connections.tokens import Connections, NeedsReconnect

# fixed, not random: it appears in test ids, which pytest-xdist needs equal in every process
ID = str(uuid.uuid5(uuid.NAMESPACE_URL, __name__))


@pytest.fixture
def key(monkeypatch: pytest.MonkeyPatch) -> str:
    k = Fernet.generate_key().decode()
    monkeypatch.setenv("AWORK_SECRETS_KEY", k)
    monkeypatch.delenv("AWORK_SECRETS_KEY_FILE", raising=False)
    return k


@pytest.fixture
def client(producer_env: dict[str, str]) -> redis.Redis:
    c = redis.Redis.from_url(producer_env["REDIS_URL"])
    yield c
    c.close()


def _dump(client: redis.Redis) -> bytes:
    """Every byte Redis holds (keys and values), for plain-text scans."""
    out = b""
    for k in client.scan_iter(count=1000):
        out += k
        t = client.type(k)
        if t == b"hash":
            for f, v in client.hgetall(k).items():
                out += f + v
        elif t == b"string":
            out += client.get(k) or b""
        elif t == b"set":
            out += b"".join(client.smembers(k))
        elif t == b"zset":
            out += b"".join(m for m, _ in client.zrange(k, 0, -1, withscores=True))
        elif t == b"list":
            out += b"".join(client.lrange(k, 0, -1))
    return out


def test_secrets_are_ciphertext_and_producers_never_see_them(client: redis.Redis, key: str) -> None:
    store = ConnectionStore(client, SecretBox.from_env())
    store.add_api_key("acme", "sk-live-very-secret-123", {"plan": "enterprise"})
    store.add_oauth("globex", "rt-very-secret-456", "at-very-secret-789", 3600)
    dump = _dump(client)
    for plain in (b"sk-live-very-secret-123", b"rt-very-secret-456", b"at-very-secret-789", key.encode()):
        assert plain not in dump
    info = ConnectionRegistry(client).get("acme")
    assert (
        info is not None and info.kind == "api_key" and info.state == "active" and info.plan == "enterprise"
    )
    assert "secret" not in json.dumps(info.to_json())
    conn = store.load("acme")
    assert conn is not None and conn.api_key is not None
    assert conn.api_key.reveal() == "sk-live-very-secret-123"
    assert conn.limits.per_minute == 3000
    assert "sk-live" not in repr(conn)


def test_rekey_moves_every_secret_to_the_new_key(
    client: redis.Redis, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ConnectionStore(client, SecretBox.from_env()).add_api_key("acme", "k1")
    new = Fernet.generate_key().decode()
    monkeypatch.setenv("AWORK_SECRETS_KEY", f"{new},{key}")
    assert cli_main(["connections", "rekey"]) == 0
    only_new = ConnectionStore(client, SecretBox([new]))
    conn = only_new.load("acme")
    assert conn is not None and conn.api_key is not None and conn.api_key.reveal() == "k1"
    # the old key alone no longer opens it
    with pytest.raises(Exception, match="does not decrypt"):
        ConnectionStore(client, SecretBox([key])).load("acme")


def test_wrong_key_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWORK_SECRETS_KEY", "not-a-key")
    with pytest.raises(Exception, match="AWORK_SECRETS_KEY: key #1 is not a Fernet key"):
        SecretBox.from_env()
    monkeypatch.delenv("AWORK_SECRETS_KEY")
    with pytest.raises(Exception, match="AWORK_SECRETS_KEY: not set"):
        SecretBox.from_env()


def test_cli_add_list_show_remove_and_enqueue(
    client: redis.Redis,
    key: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    keyfile = tmp_path / "acme.key"
    keyfile.write_text("sk-acme\n")
    keyfile.chmod(0o600)
    assert (
        cli_main(["connections", "add", "acme", "--api-key-file", str(keyfile), "--plan", "enterprise"]) == 0
    )
    monkeypatch.setenv("GLOBEX_KEY", "sk-globex")
    assert cli_main(["connections", "add", "globex", "--api-key-env", "GLOBEX_KEY"]) == 0
    capsys.readouterr()
    assert cli_main(["connections", "list", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["name"], r["kind"], r["state"]) for r in rows] == [
        ("acme", "api_key", "active"),
        ("globex", "api_key", "active"),
    ]
    assert "sk-" not in json.dumps(rows)
    # bad input names the field
    assert cli_main(["connections", "add", "x y", "--api-key-env", "GLOBEX_KEY"]) == 2
    assert "workspace:" in capsys.readouterr().err
    assert cli_main(["connections", "add", "z", "--plan", "gold", "--api-key-env", "GLOBEX_KEY"]) == 2
    assert "plan" in capsys.readouterr().err
    assert not client.sismember(CONNECTIONS_KEY, "z")

    src = tmp_path / "a.txt"
    src.write_bytes(b"hello")
    with Uploads.from_env() as up:
        job = up.enqueue(src, to=f"task:{ID}", workspace="acme")
        assert job.state is JobState.QUEUED
        with pytest.raises(SpecError, match="unknown workspace 'nobody'"):
            up.enqueue(src, to=f"task:{ID}", workspace="nobody")
        # an active job: remove refuses, --force fails it with a clear code
        assert cli_main(["connections", "remove", "acme"]) == 1
        assert "1 active job" in capsys.readouterr().err
        assert cli_main(["connections", "remove", "acme", "--force"]) == 0
        rec = up.store.get(job.id) or {}
        assert rec["state"] == "failed" and rec["error_code"] == "connection-removed"
        assert not client.exists(connection_key("acme"))
        with pytest.raises(SpecError, match="unknown workspace 'acme'"):
            up.enqueue(src, to=f"task:{ID}", workspace="acme")


def test_worker_cache_sees_changes_and_needs_reconnect(client: redis.Redis, key: str) -> None:
    store = ConnectionStore(client, SecretBox.from_env())
    store.add_api_key("acme", "k1")
    conns = Connections(store, None, ttl=0.0)
    assert conns.bearer("acme").reveal() == "k1"
    store.add_api_key("acme", "k2")  # replaced: the version check drops the cached one
    assert conns.bearer("acme").reveal() == "k2"
    store.add_oauth("globex", "rt-1", "at-1", 3600)
    assert conns.bearer("globex").reveal() == "at-1"
    store.mark_needs_reconnect("globex", "invalid_grant")
    with pytest.raises(NeedsReconnect):
        conns.bearer("globex")
    assert conns.cached_count() <= 2


class _TokenEndpoint:
    """Stands in for awork's token endpoint in unit tests: answers invalid_grant, and may have a
    new grant arrive (an operator's `connections add`) while the refresh is in flight."""

    def __init__(self, store: ConnectionStore, new_grant_meanwhile: bool) -> None:
        self.store = store
        self.new_grant_meanwhile = new_grant_meanwhile
        self.calls = 0

    def refresh(self, refresh_token: object) -> object:
        from workers.connections.oauth import InvalidGrant

        self.calls += 1
        if self.new_grant_meanwhile:
            self.store.add_oauth("globex", "rt-new", "at-new", 3600)
        raise InvalidGrant("token endpoint: invalid_grant", status=400, code="invalid_grant")


def test_invalid_grant_rereads_before_declaring_the_grant_dead(client: redis.Redis, key: str) -> None:
    from workers.errors import TransientError

    store = ConnectionStore(client, SecretBox.from_env())
    store.add_oauth("globex", "rt-old", "at-old", 0)  # access token already due
    endpoint = _TokenEndpoint(store, new_grant_meanwhile=True)
    conns = Connections(store, endpoint, ttl=0.0)  # type: ignore[arg-type]
    with pytest.raises(TransientError, match="grant replaced"):
        conns.bearer("globex")
    info = ConnectionRegistry(client).get("globex")
    assert info is not None and info.state == "active"
    assert conns.bearer("globex").reveal() == "at-new"


def test_invalid_grant_with_unchanged_token_means_needs_reconnect(client: redis.Redis, key: str) -> None:
    store = ConnectionStore(client, SecretBox.from_env())
    store.add_oauth("globex", "rt-old", "at-old", 0)
    endpoint = _TokenEndpoint(store, new_grant_meanwhile=False)
    conns = Connections(store, endpoint, ttl=0.0)  # type: ignore[arg-type]
    with pytest.raises(NeedsReconnect):
        conns.bearer("globex")
    info = ConnectionRegistry(client).get("globex")
    assert info is not None and info.state == "needs_reconnect" and info.reason == "invalid_grant"
    with pytest.raises(NeedsReconnect):  # no second call to the token endpoint
        conns.bearer("globex")
    assert endpoint.calls == 1
    store.add_oauth("globex", "rt-2", "at-2", 3600)  # the customer connected again
    assert conns.bearer("globex").reveal() == "at-2"


def test_connection_commands_refuse_an_http_api_url(
    client: redis.Redis, key: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The commands send the client secret and the tokens to AWORK_API_URL: the workers' https
    rule holds for them too (exit 2, the error names the variable, nothing is written)."""
    monkeypatch.setenv("AWORK_OAUTH_CLIENT_ID", "cid")
    monkeypatch.setenv("AWORK_OAUTH_CLIENT_SECRET", "client-secret")
    monkeypatch.setenv("AWORK_API_URL", "http://awork.example/api/v1")
    monkeypatch.delenv("AWORK_ALLOW_INSECURE_API", raising=False)
    argv = ["connections", "oauth-url", "acme", "--redirect-uri", "https://app.example/callback"]
    assert cli_main(argv) == 2
    out = capsys.readouterr()
    assert "AWORK_API_URL: http://" in out.err and "awork.example" not in out.out
    assert list(client.scan_iter(match="awork:oauth:pending:*")) == []
    monkeypatch.setenv("AWORK_API_URL", "https://awork.example/api/v1")
    assert cli_main(argv) == 0
    assert capsys.readouterr().out.startswith("https://awork.example/api/v1/accounts/authorize?")


def test_a_connection_hash_cannot_redirect_its_token(
    client: redis.Redis, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A registered connection's requests go to AWORK_API_URL (checked at start): an `api_url`
    field written into its hash by a Redis client is not a place to send its key."""
    from workers.runtime import Runtime
    from workers.settings import WorkerSettings

    ConnectionStore(client, SecretBox.from_env()).add_api_key("acme", "k1")
    client.hset(connection_key("acme"), "api_url", "http://collector.example/api/v1")
    monkeypatch.setenv("AWORK_API_URL", "https://api.awork.example/api/v1")
    rt = Runtime(WorkerSettings.from_env())
    try:
        assert rt.client("acme").api_url == "https://api.awork.example/api/v1"
    finally:
        rt.redis.close()


def test_a_negative_connection_setting_names_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from producers.config import ConfigError
    from workers.connections.settings import ConnectionSettings

    for var in (
        "AWORK_CONNECTION_CACHE_SECONDS",
        "AWORK_CONNECTION_RECHECK_SECONDS",
        "AWORK_OAUTH_KEEPALIVE_SECONDS",
    ):
        monkeypatch.setenv(var, "-1")
        with pytest.raises(ConfigError, match=f"^{var}: must not be negative"):
            ConnectionSettings.from_env("https://api.awork.example/api/v1")
        monkeypatch.delenv(var)
