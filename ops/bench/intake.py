"""The HTTP intake's figures. Run by hand, not in the tests:

    .venv/bin/python -m ops.bench.intake [--only batches,body,get] [--batches 5] [--batch-size 10000]
        [--body-mib 1024] [--clients 100] [--seconds 10]

Starts a private redis-server and `awork-uploads api` (one uvicorn process) on free loopback
ports, makes a token, and measures, with no worker running:

- batches: `POST /v1/batches` of URL sources, `--batches` requests of `--batch-size` jobs:
  jobs enqueued per second (request sent to answer received, JSON encoding of the request not
  counted).
- body: `POST /v1/jobs` with a `--body-mib` MiB body streamed from a file, against `cp` of the
  same file into the staging folder (page cache warm for both), and the intake's peak resident
  memory (VmHWM) before and after: the streamed path keeps it flat.
- get: `GET /v1/jobs/{id}` from `--clients` concurrent clients for `--seconds`: requests/s and
  latency percentiles (p50, p99).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

from ops.local_fleet import FleetOptions, LocalFleet
from ops.processes import Child
from ops.redis_server import free_port
from producers.api_tokens import ApiTokens

HOST = "files.example.com"


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def bench_batches(url: str, auth: dict[str, str], batches: int, size: int) -> None:
    bodies = []
    for b in range(batches):
        jobs = [
            {"to": f"task:{uuid.UUID(int=b * size + i)}", "source_url": f"https://{HOST}/x/{b}/{i}.pdf"}
            for i in range(size)
        ]
        bodies.append(json.dumps({"jobs": jobs}).encode())
    with httpx.Client(base_url=url, headers={**auth, "Content-Type": "application/json"}, timeout=300) as c:
        c.post(
            "/v1/batches",
            content=json.dumps(
                {"jobs": [{"to": f"task:{uuid.uuid4()}", "source_url": f"https://{HOST}/warm.pdf"}]}
            ),
        )
        took = []
        for body in bodies:
            t0 = time.perf_counter()
            resp = c.post("/v1/batches", content=body)
            took.append(time.perf_counter() - t0)
            assert resp.status_code == 202, resp.text[:300]
    total = batches * size
    print(
        f"batches: {batches} x {size} URL jobs in {sum(took):.2f} s = {total / sum(took):,.0f} jobs/s "
        f"(per request: best {size / min(took):,.0f}, worst {size / max(took):,.0f} jobs/s)"
    )


def bench_body(url: str, auth: dict[str, str], mib: int, root: Path, staging: Path, pid: int) -> None:
    src = root / "body.bin"
    with src.open("wb") as f:
        block = os.urandom(1024 * 1024)
        for _ in range(mib):
            f.write(block)
    subprocess.run(["cat", str(src)], stdout=subprocess.DEVNULL, check=True)  # warm the page cache
    dest = staging / "cp-copy.bin"
    t0 = time.perf_counter()
    subprocess.run(["cp", str(src), str(dest)], check=True)
    cp_s = time.perf_counter() - t0
    dest.unlink()
    rss_before = _peak_rss_mib(pid)

    # curl streams the file (-T) with little CPU of its own: the figure is the intake's
    target = f"{url}/v1/jobs?to=task:{uuid.uuid4()}&name=body.bin"
    argv = [
        "curl",
        "-sS",
        "-X",
        "POST",
        "-T",
        str(src),
        "-H",
        "Content-Type: application/octet-stream",
        "-H",
        f"Authorization: {auth['Authorization']}",
        "-o",
        "-",
        "-w",
        "\n%{http_code}",
        target,
    ]
    t0 = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, check=True)
    api_s = time.perf_counter() - t0
    answer, status = done.stdout.rsplit("\n", 1)
    assert status == "202", answer[:300]
    resp = httpx.Response(202, content=answer.encode())
    rss_after = _peak_rss_mib(pid)
    shutil.rmtree(staging / resp.json()["id"], ignore_errors=True)
    print(
        f"body: {mib} MiB: cp {mib / cp_s:,.0f} MiB/s ({cp_s:.2f} s), POST /v1/jobs {mib / api_s:,.0f} MiB/s "
        f"({api_s:.2f} s, MD5 included) = {cp_s / api_s:.2f}x cp; intake peak RSS {rss_before:.0f} MiB "
        f"before, {rss_after:.0f} MiB after"
    )


async def _get_load(
    url: str, auth: dict[str, str], ids: list[str], clients: int, seconds: float
) -> list[float]:
    import aiohttp  # a lighter client than httpx: the load generator shares the machine

    latencies: list[float] = []
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(url, headers=auth, connector=connector) as c:
        deadline = time.perf_counter() + seconds

        async def one(n: int) -> None:
            i = n
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                async with c.get(f"/v1/jobs/{ids[i % len(ids)]}") as resp:
                    await resp.read()
                    assert resp.status == 200, resp.status
                latencies.append(time.perf_counter() - t0)
                i += clients

        await asyncio.gather(*(one(n) for n in range(clients)))
    return latencies


def bench_get(url: str, auth: dict[str, str], clients: int, seconds: float) -> None:
    with httpx.Client(base_url=url, headers=auth, timeout=60) as c:
        jobs = [
            {"to": f"task:{uuid.uuid4()}", "source_url": f"https://{HOST}/g/{i}.pdf"} for i in range(1000)
        ]
        ids = c.post("/v1/batches", json={"jobs": jobs}).json()["job_ids"]
    lat = sorted(asyncio.run(_get_load(url, auth, ids, clients, seconds)))
    q = statistics.quantiles(lat, n=100)
    print(
        f"get: {clients} clients, {len(lat) / seconds:,.0f} requests/s, p50 {q[49] * 1000:.1f} ms, "
        f"p99 {q[98] * 1000:.1f} ms, max {lat[-1] * 1000:.1f} ms"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="batches,body,get")
    p.add_argument("--batches", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=10_000)
    p.add_argument("--body-mib", type=int, default=1024)
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--seconds", type=float, default=10.0)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="awork-bench-intake-") as tmp:
        root = Path(tmp)
        # Redis alone: no worker runs in these measurements.
        fleet = LocalFleet(FleetOptions(root=root, workers=0, drop_env=("AWORK_",))).start()
        staging = Path(fleet.env["STAGING_DIR"])
        port = free_port()
        env = {**fleet.env, "AWORK_SOURCE_URL_HOSTS": HOST, "AWORK_MAX_SOURCE_BYTES": str(8 * 1024**3)}
        argv_api = [
            sys.executable,
            "-m",
            "ops.cli",
            "api",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ]
        api = Child("api", argv_api, env, root / "api.log")
        try:
            api.start()
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 30
            while True:
                try:
                    if httpx.get(f"{url}/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("the intake did not start: " + (root / "api.log").read_text()[-2000:])
                time.sleep(0.2)
            client = fleet.redis_client(decode_responses=False)
            token = ApiTokens(client).create("bench", ["default"], lambda s: "not-sealed", rate=10**9).token
            auth = {"Authorization": f"Bearer {token}"}
            only = set(args.only.split(","))
            if "batches" in only:
                bench_batches(url, auth, args.batches, args.batch_size)
                client.flushall()
                token = (
                    ApiTokens(client).create("bench", ["default"], lambda s: "not-sealed", rate=10**9).token
                )
                auth = {"Authorization": f"Bearer {token}"}
            if "body" in only:
                assert api.pid is not None
                bench_body(url, auth, args.body_mib, root, staging, api.pid)
            if "get" in only:
                bench_get(url, auth, args.clients, args.seconds)
            client.close()
        finally:
            try:
                api.stop()
            finally:
                fleet.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
