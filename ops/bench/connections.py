"""Connections at scale: refresh latency, refreshes per hour, worker RSS with many connections.

Run by hand (about a minute):

    .venv/bin/python -m ops.bench.connections [--connections 1000] [--active 50] [--refreshes 200]

With a private redis-server and a sandbox on loopback it measures:
- refresh latency: --refreshes single-flight refreshes of one OAuth grant (lock, re-read,
  token endpoint, encrypted store), p50 / p95 / max in ms;
- refreshes per hour per connection at awork's real lifetimes (expires_in 86400, refresh a
  tenth ahead at most 5 minutes; keepalive of idle grants every AWORK_OAUTH_KEEPALIVE_SECONDS);
- a real worker process (threads pool, 8 threads): its RSS and time to answer ping with 0
  registered connections, then with --connections registered (API keys), and its RSS after
  uploads through --active of them (2 jobs each).
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import redis
import requests
from cryptography.fernet import Fernet

from ops.local_fleet import FleetOptions, FleetWorker, LocalFleet, SandboxOptions
from ops.sandbox.launcher import SandboxProcess
from producers.client import Uploads
from producers.spec import JobSpec
from workers.connections.crypto import SecretBox
from workers.connections.oauth import OAuthClient, begin_authorization, complete_authorization
from workers.connections.settings import DEFAULT_KEEPALIVE_SECONDS
from workers.connections.store import ConnectionStore
from workers.connections.tokens import Connections, refresh_ahead
from workers.settings import Secret


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def refresh_latency(
    sb: SandboxProcess, client: redis.Redis, box: SecretBox, cid: str, csecret: str, n: int
) -> dict[str, float]:
    store = ConnectionStore(client, box)
    oauth = OAuthClient(cid, Secret(csecret), sb.api_url)
    url = begin_authorization(store, oauth, "bench-oauth", "https://app.example/cb")
    loc = requests.get(url + "&workspace=bench", allow_redirects=False, timeout=10).headers["Location"]
    q = parse_qs(urlsplit(loc).query)
    complete_authorization(store, oauth, "bench-oauth", q["code"][0], q["state"][0])
    conns = Connections(store, oauth, ttl=0)
    times = []
    for _ in range(n):
        seen = conns.bearer("bench-oauth")
        t0 = time.perf_counter()
        conns.refresh("bench-oauth", seen)
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    return {
        "p50_ms": round(statistics.median(times), 2),
        "p95_ms": round(times[int(len(times) * 0.95) - 1], 2),
        "max_ms": round(times[-1], 2),
    }


def per_hour() -> dict[str, float]:
    lifetime = 86400.0
    every = lifetime - refresh_ahead(lifetime)
    return {
        "active_connection_refreshes_per_hour": round(3600 / every, 4),
        "idle_connection_keepalive_refreshes_per_hour": round(3600 / DEFAULT_KEEPALIVE_SECONDS, 4),
    }


def worker_figures(
    fleet: LocalFleet, client: redis.Redis, box: SecretBox, total: int, active: int, keys: dict[str, str]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    sb = fleet.sandbox
    assert sb is not None

    def start() -> tuple[FleetWorker, float]:
        child = fleet.add_workers(1)[0]
        t0 = time.monotonic()
        fleet.wait_ready(timeout=3600)
        return child, time.monotonic() - t0

    child, ready = start()
    time.sleep(1)
    out["rss_kib_no_connections"] = rss_kib(child.proc.pid)  # type: ignore[union-attr]
    out["ready_s_no_connections"] = round(ready, 2)
    fleet.stop_worker(child)

    store = ConnectionStore(client, box)
    key_list = list(keys)
    for i in range(total):
        key = key_list[i] if i < active else f"unused-{secrets.token_hex(8)}"
        store.add_api_key(f"c{i:04d}", key, {"per_minute": 100000, "per_second": 5000})
    child, ready = start()
    time.sleep(1)
    out[f"rss_kib_{total}_connections"] = rss_kib(child.proc.pid)  # type: ignore[union-attr]
    out[f"ready_s_{total}_connections"] = round(ready, 2)
    up = Uploads(fleet.shared_settings())
    specs = []
    for i in range(active):
        task = str(uuid.uuid4())
        sb.seed("tasks", task, workspace=keys[key_list[i]])
        specs += [JobSpec(b"x" * 1024, f"task:{task}", f"c{i:04d}", f"f{j}.bin") for j in range(2)]
    t0 = time.monotonic()
    jobs = up.enqueue_many(specs)
    final = up.wait_many([j.id for j in jobs], timeout=300)
    out["jobs_done"] = sum(j.state.value == "done" for j in final)
    out["jobs_seconds"] = round(time.monotonic() - t0, 1)
    out[f"rss_kib_{total}_connections_after_{active}_active"] = rss_kib(child.proc.pid)  # type: ignore[union-attr]
    up.close()
    fleet.stop_worker(child)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ops.bench.connections")
    p.add_argument("--connections", type=int, default=1000)
    p.add_argument("--active", type=int, default=50)
    p.add_argument("--refreshes", type=int, default=200)
    args = p.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bench-conn-"))
    cid, csecret = "bench-client", secrets.token_hex(16)
    keys = {f"key-{i}-{secrets.token_hex(6)}": f"ws-{i}" for i in range(args.active)}
    secrets_key = Fernet.generate_key().decode()
    sandbox = SandboxOptions(
        keys,
        "adm",
        [
            *("--oauth-client", f"{cid}:{csecret}"),
            *("--rate-limit-per-minute", "1000000", "--rate-limit-per-second", "100000"),
        ],
        worker_key=False,
    )
    fleet = LocalFleet(
        FleetOptions(
            root=root,
            workers=0,
            concurrency=8,
            node_name="bench-{n}-{uid}@localhost",
            env={"AWORK_SECRETS_KEY": secrets_key},
            drop_env=("AWORK_",),
            sandbox=sandbox,
            stop_grace=10,
        )
    )
    box = SecretBox([secrets_key])
    try:
        fleet.start()
        assert fleet.sandbox is not None
        client = fleet.redis_client(decode_responses=False)
        figures: dict[str, Any] = {
            "refresh_latency": refresh_latency(fleet.sandbox, client, box, cid, csecret, args.refreshes)
        }
        figures.update(per_hour())
        figures["worker"] = worker_figures(fleet, client, box, args.connections, args.active, keys)
        client.close()
    finally:
        fleet.stop()
    json.dump(figures, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
