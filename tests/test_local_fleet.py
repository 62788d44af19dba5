"""LocalFleet: ready means every part answers, and no process outlives it, even when a start
fails half-way (real redis-server, sandbox, worker and Flower processes)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest
import requests

from ops.local_fleet import FleetOptions, FlowerOptions, LocalFleet, SandboxOptions, ping_workers
from ops.sandbox.launcher import SandboxStartError

pytestmark = pytest.mark.slow


def gone(pid: int | None) -> bool:
    """The process has exited and was reaped (or never started)."""
    if pid is None:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def sandbox() -> SandboxOptions:
    return SandboxOptions({"key-" + secrets.token_hex(6): "default"}, "admin-" + secrets.token_hex(6))


def test_ready_means_workers_and_flower_answer_and_stop_leaves_nothing(tmp_path: Path) -> None:
    options = FleetOptions(
        root=tmp_path,
        workers=2,
        concurrency=2,
        node_name="lf{n}-{uid}@{host}",
        sandbox=sandbox(),
        flower=FlowerOptions(basic_auth="admin:" + secrets.token_hex(8)),
        stop_grace=10,
    )
    with LocalFleet(options) as fleet:
        assert fleet.redis is not None and fleet.sandbox is not None and fleet.flower is not None
        assert ping_workers(fleet.env) == 2
        assert sorted(fleet.hostnames) == sorted(w.node_name for w in fleet.workers)
        assert requests.get(f"{fleet.flower.url}/healthcheck", timeout=5).status_code == 200
        assert fleet.env["AWORK_API_URL"] == fleet.sandbox.api_url
        assert fleet.env["AWORK_API_KEY"] == fleet.sandbox.api_key
        assert Path(fleet.env["STAGING_DIR"]) == (tmp_path / "staging").resolve()
        # a restart puts a fresh process (same number, new node name) in the old one's place
        old = fleet.workers[1]
        old.kill()
        fresh = fleet.restart(old)
        assert fleet.workers[1] is fresh and fresh.name == old.name and fresh.node_name != old.node_name
        assert old.node_name not in fleet.hostnames
        fleet.wait_ready()
        pids = [
            *(w.pid for w in fleet.workers),
            fleet.flower.child.pid,
            fleet.sandbox.pid,
            fleet.redis.proc.pid if fleet.redis.proc else None,
        ]
    assert all(gone(pid) for pid in pids)
    assert (tmp_path / "logs" / "worker-1.log").exists()


def test_a_sandbox_that_cannot_start_stops_the_redis_started_before_it(tmp_path: Path) -> None:
    bad = sandbox()
    bad.args = ["--no-such-flag"]
    fleet = LocalFleet(FleetOptions(root=tmp_path, workers=1, sandbox=bad))
    with pytest.raises(SandboxStartError):
        fleet.start()
    assert fleet.redis is not None and fleet.redis.proc is not None
    assert fleet.redis.proc.poll() is not None
    assert fleet.workers == []


def test_a_worker_that_exits_at_start_fails_the_start_and_stops_everything(tmp_path: Path) -> None:
    # A worker refuses a clear-text API URL off loopback: it exits (status 2) instead of starting.
    options = FleetOptions(
        root=tmp_path,
        workers=1,
        concurrency=1,
        sandbox=sandbox(),
        env={"AWORK_API_URL": "http://api.example.com/api/v1"},
        stop_grace=5,
    )
    fleet = LocalFleet(options)
    with pytest.raises(RuntimeError, match="worker-1 exited"):
        fleet.start()
    assert fleet.sandbox is not None and fleet.sandbox.proc is not None
    assert fleet.sandbox.proc.poll() is not None
    assert fleet.redis is not None and fleet.redis.proc is not None and fleet.redis.proc.poll() is not None
    assert all(not w.alive() for w in fleet.workers)
