"""OAuth connections end to end: 2 worker processes x 8 threads, access tokens living 3 s, jobs over
two connections; refreshes are single-flight (no invalid_grant) and about run time / lifetime;
a revoked grant parks its jobs (none dead) until a new grant is added; no secret in plain text
in Redis, the logs or Flower."""

from __future__ import annotations

import json
import secrets
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from cryptography.fernet import Fernet

from ops.cli import main as cli_main
from ops.flower import FlowerProcess
from producers.connections import ConnectionRegistry
from producers.spec import JobSpec
from tests.fleet import SECOND_KEY, Fleet, wait_until
from tests.redis_scan import redis_contents
from workers.connections.crypto import SecretBox
from workers.connections.oauth import OAuthClient, begin_authorization, complete_authorization
from workers.connections.store import ConnectionStore
from workers.settings import Secret

CLIENT_ID = "uploads-" + secrets.token_hex(4)
CLIENT_SECRET = "client-secret-" + secrets.token_hex(12)
SECRETS_KEY = Fernet.generate_key().decode()
LIFETIME = 3.0
PER_SECOND = 20
REDIRECT = "https://app.example/oauth/callback"
CONNS = {"acme": "cust-a", "globex": "cust-b"}  # connection -> the customer's awork workspace


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    f = Fleet(
        tmp_path_factory.mktemp("conn-fleet"),
        worker_count=2,
        concurrency=8,
        sandbox_args=[
            "--oauth-client", f"{CLIENT_ID}:{CLIENT_SECRET}",
            "--oauth-access-lifetime", str(LIFETIME),
            "--rate-limit-per-minute", "100000", "--rate-limit-per-second", "5000",
        ],
        extra_env={
            "AWORK_SECRETS_KEY": SECRETS_KEY,
            "AWORK_OAUTH_CLIENT_ID": CLIENT_ID,
            "AWORK_OAUTH_CLIENT_SECRET": CLIENT_SECRET,
            "AWORK_CONNECTION_RECHECK_SECONDS": "1",
            "AWORK_CONNECTION_CACHE_SECONDS": "1",
            "AWORK_RATE_LIMIT_PER_MINUTE": "100000",
        },
    )  # fmt: skip
    f.start()
    yield f
    f.stop()


def _store(fleet: Fleet) -> ConnectionStore:
    return ConnectionStore(fleet.client(), SecretBox([SECRETS_KEY]))


def _connect(fleet: Fleet, name: str) -> None:
    """What a customer does: open the authorize URL, approve, come back with code and state."""
    store = _store(fleet)
    client = OAuthClient(CLIENT_ID, Secret(CLIENT_SECRET), fleet.sandbox.api_url)
    # 20 requests/s per connection: 300 requests each take ~16 s, several token lifetimes
    url = begin_authorization(store, client, name, REDIRECT, {"per_minute": 100000, "per_second": PER_SECOND})
    r = requests.get(f"{url}&workspace={CONNS[name]}", allow_redirects=False, timeout=10)
    assert r.status_code == 302, r.text
    q = parse_qs(urlsplit(r.headers["Location"]).query)
    info = complete_authorization(store, client, name, q["code"][0], q["state"][0])
    assert info.state == "active" and info.kind == "oauth"


def _specs(fleet: Fleet, name: str, n: int) -> list[JobSpec]:
    task = str(uuid.uuid4())
    fleet.sandbox.seed("tasks", task, workspace=CONNS[name])
    return [JobSpec(f"{name} {i}".encode(), f"task:{task}", name, f"f{i}.txt") for i in range(n)]


def test_api_key_connection_added_at_run_time(fleet: Fleet) -> None:
    """A connection registered while the workers run serves jobs without a restart."""
    _store(fleet).add_api_key("initech", SECOND_KEY)
    task = fleet.entity("tasks")
    jobs = fleet.uploads.enqueue_many(
        [JobSpec(b"k%d" % i, f"task:{task}", "initech", f"k{i}.txt") for i in range(10)]
    )
    assert all(j.state.value == "done" for j in fleet.wait(jobs, timeout=30))
    assert len(fleet.files_of(task)) == 10


def test_refresh_is_single_flight_then_revoke_parks_and_reconnect_resumes(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Flower watches the whole run: its task list and task pages are scanned for secrets at the end
    with FlowerProcess(fleet.env, basic_auth="ops:" + uuid.uuid4().hex) as flower:
        _run_refresh_revoke_reconnect(fleet, flower, monkeypatch, capsys)


def _run_refresh_revoke_reconnect(
    fleet: Fleet, flower: FlowerProcess, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in CONNS:
        _connect(fleet, name)
    # -- 300 jobs over two connections, tokens living 3 s ------------------------------------
    start = time.monotonic()
    jobs = fleet.uploads.enqueue_many(_specs(fleet, "acme", 150) + _specs(fleet, "globex", 150))
    final = fleet.wait(jobs, timeout=90)
    elapsed = time.monotonic() - start
    assert [j.state.value for j in final].count("done") == 300, {j.state.value for j in final}
    oauth = fleet.sandbox.oauth_stats()
    assert oauth["invalid_grant"] == 0, oauth
    for ws in CONNS.values():
        refreshes = oauth["refreshes_by_workspace"].get(ws, 0)
        # At most one refresh per lifetime (a tenth of it ahead), plus rounding slack: more would
        # mean workers refreshing side by side. Fewer is fine: a token is refreshed only when a
        # request needs it, and on a loaded machine a connection can sit idle for a lifetime or
        # two while its jobs transfer; at least a few prove the tokens did roll over.
        assert 3 <= refreshes <= elapsed / (LIFETIME * 0.9) + 3, (ws, refreshes, elapsed)
    print(f"\nphase 1: 300 jobs in {elapsed:.1f}s, refreshes {oauth['refreshes_by_workspace']}")

    # -- the customer revokes acme's grant mid-run -------------------------------------------
    more = fleet.uploads.enqueue_many(_specs(fleet, "acme", 60) + _specs(fleet, "globex", 20))
    acme_ids = [j.id for j in more[:60]]
    assert fleet.sandbox.revoke_grants("cust-a") == 1
    registry = ConnectionRegistry(fleet.client())

    def parked() -> bool:
        info = registry.get("acme")
        states = [fleet.record(i).get("state") for i in acme_ids]
        return info is not None and info.state == "needs_reconnect" and "waiting_for_connection" in states

    wait_until(parked, timeout=30, what="acme's jobs parked")
    time.sleep(2)  # parked jobs look again every second: they must stay parked, not fail
    records = [fleet.record(i) for i in acme_ids]
    assert not [r for r in records if r.get("state") in ("failed", "dead")]
    waiting = [r for r in records if r.get("state") == "waiting_for_connection"]
    assert waiting and all(r.get("wait_reason") == "connection" for r in waiting)
    # parking used no error retries
    assert all(int(r.get(f"errors_{s}") or 0) == 0 for r in records for s in ("generate", "link"))
    # globex kept flowing
    globex = fleet.wait(more[60:], timeout=30)
    assert all(j.state.value == "done" for j in globex)

    _connect(fleet, "acme")  # a new grant
    final = fleet.wait(more[:60], timeout=60)
    assert [j.state.value for j in final].count("done") == 60, {j.state.value for j in final}
    assert fleet.sandbox.oauth_stats()["invalid_grant"] == 1  # the one refresh that found it revoked
    for k in (
        "REDIS_URL",
        "AWORK_API_URL",
        "AWORK_SECRETS_KEY",
        "AWORK_OAUTH_CLIENT_ID",
        "AWORK_OAUTH_CLIENT_SECRET",
    ):
        monkeypatch.setenv(k, fleet.env[k])
    capsys.readouterr()
    assert cli_main(["connections", "test", "acme"]) == 0
    assert "acme: ok" in capsys.readouterr().out

    # -- no secret in plain text anywhere ----------------------------------------------------
    issued = fleet.sandbox.admin("GET", "/oauth/issued")["tokens"]
    assert len(issued) >= 6
    needles = [t.encode() for t in issued] + [CLIENT_SECRET.encode(), SECRETS_KEY.encode()]
    haystacks = {"redis": "\n".join(text for _, text in redis_contents(fleet.client())).encode()}
    tasks = flower.wait_for_tasks(lambda ts: len(ts) >= 300, timeout=30)
    haystacks["flower /api/tasks"] = json.dumps(tasks).encode()
    for tid in list(tasks)[:: max(1, len(tasks) // 40)]:
        haystacks[f"flower /api/task/info/{tid}"] = flower.get(f"/api/task/info/{tid}").content
    for log in Path(fleet.root / "logs").glob("*.log"):
        haystacks[log.name] = log.read_bytes()
    leaks = [(where, n[:6]) for where, hay in haystacks.items() for n in needles if n in hay]
    assert not leaks
