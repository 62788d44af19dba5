"""Sandbox benchmark: small API requests/s on one core, and a 1 GiB `curl -T` vs Azurite.

    .venv/bin/python -m ops.bench.sandbox_bench                 # everything
    .venv/bin/python -m ops.bench.sandbox_bench --skip-put      # API figures only
    .venv/bin/python -m ops.bench.sandbox_bench --put-rounds 5 --put-mib 1024

API: the sandbox runs pinned to core 0 (`taskset -c 0`), wrk (`apt-get install -y wrk`) pinned
to core 1, keep-alive connections on loopback, rate limits lifted so every request does the
full work (auth, limiter, faults, handler, counters). Three requests: POST generateuploadurl,
GET /tasks/{id}/files (an empty page), and POST .../files/byuploadid (with duplicate-on-relink
so every request creates a file).

"Requests per CPU-second" divides the requests by the CPU time the sandbox process used: what
one core fully given to it can serve, even when other work shares the machine.

PUT: one file of random bytes, `curl -T` to the sandbox's blob host and to Azurite (npm
package `azurite`, started here on a private port and directory) in alternating rounds, each
to a fresh SAS URL; neither is pinned. Prints a Markdown summary for ops/bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

from ops.azurite import Azurite, AzuriteUnavailable, find_azurite_blob
from ops.sandbox.launcher import SandboxProcess

REPO = Path(__file__).resolve().parents[2]
KEY = "bench-key"
MiB = 1024 * 1024


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process: its CPU use, whatever else the machine is doing."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wrk(pid: int, url: str, seconds: int, connections: int,
        script: Path | None) -> tuple[float, float]:
    """(requests/s as wrk measured it, requests per CPU-second of the sandbox)."""
    cmd = ["taskset", "-c", "1", "wrk", "-t1", f"-c{connections}", f"-d{seconds}s",
           "-H", f"Authorization: Bearer {KEY}", url]
    if script is not None:
        cmd[6:6] = ["-s", str(script)]
    cpu0 = _cpu_seconds(pid)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    cpu = _cpu_seconds(pid) - cpu0
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    n = re.search(r"(\d+) requests in", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m is None or n is None:
        raise RuntimeError(out)
    if non2xx:
        raise RuntimeError(f"wrk saw {non2xx.group(1)} error responses:\n{out}")
    return float(m.group(1)), int(n.group(1)) / cpu


def bench_api(seconds: int, connections: int, tmp: Path) -> dict[str, tuple[float, float]]:
    if shutil.which("wrk") is None or shutil.which("taskset") is None:
        raise SystemExit("needs wrk and taskset: apt-get install -y wrk util-linux")
    extra = ["--rate-limit-per-minute", str(10**9), "--rate-limit-per-second", str(10**9),
             "--duplicate-on-relink"]
    with SandboxProcess(api_keys={KEY: "bench"}, extra_args=extra,
                        wrapper=["taskset", "-c", "0"], data_dir=tmp / "sandbox-api") as sb:
        task = sb.seed("tasks")
        h = {"Authorization": f"Bearer {KEY}"}
        g = requests.post(f"{sb.api_url}/files/generateuploadurl", headers=h, timeout=10).json()
        requests.put(g["uploadURL"], data=b"x" * 1000, headers={"x-ms-blob-type": "BlockBlob"},
                     timeout=10).raise_for_status()
        post = tmp / "post.lua"
        post.write_text('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n')
        link = tmp / "link.lua"
        link.write_text(
            'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
            f"wrk.body = '{json.dumps({'uploadId': g['uploadId'], 'fileName': 'b.bin'})}'\n"
        )
        results = {
            "POST /files/generateuploadurl": wrk(sb.pid, f"{sb.api_url}/files/generateuploadurl",
                                                 seconds, connections, post),
            "GET /tasks/{id}/files": wrk(sb.pid, f"{sb.api_url}/tasks/{task}/files", seconds,
                                         connections, None),
        }
        sb.reset()  # forget the uploads of the first run: the link run starts fresh
        g = requests.post(f"{sb.api_url}/files/generateuploadurl", headers=h, timeout=10).json()
        requests.put(g["uploadURL"], data=b"x" * 1000, headers={"x-ms-blob-type": "BlockBlob"},
                     timeout=10).raise_for_status()
        link.write_text(
            'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
            f"wrk.body = '{json.dumps({'uploadId': g['uploadId'], 'fileName': 'b.bin'})}'\n"
        )
        results["POST /tasks/{id}/files/byuploadid"] = wrk(
            sb.pid, f"{sb.api_url}/tasks/{task}/files/byuploadid", seconds, connections, link)
    return results


def curl_put(url: str, path: Path) -> float:
    t = time.monotonic()
    out = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-X", "PUT", url,
         "-H", "x-ms-blob-type: BlockBlob", "-H", "Content-Type: application/octet-stream",
         "-T", str(path)],
        check=True, capture_output=True, text=True,
    ).stdout
    seconds = time.monotonic() - t
    if out != "201":
        raise RuntimeError(f"PUT answered {out}")
    return seconds


def bench_put(mib: int, rounds: int, tmp: Path) -> dict[str, list[float]]:
    try:
        find_azurite_blob()
    except AzuriteUnavailable as exc:
        raise SystemExit(str(exc)) from None
    data = tmp / "put.bin"
    block = os.urandom(MiB)
    with open(data, "wb") as f:
        for i in range(mib):
            f.write(block[i % 7:] + block[: i % 7])  # every MiB different
    times: dict[str, list[float]] = {"sandbox": [], "azurite": []}
    with SandboxProcess(api_keys={KEY: "bench"}, data_dir=tmp / "sandbox-put") as sb, \
            Azurite(tmp / "azurite") as az:
        az.create_container("bench")
        h = {"Authorization": f"Bearer {KEY}"}
        for i in range(rounds):
            for name in ("sandbox", "azurite") if i % 2 == 0 else ("azurite", "sandbox"):
                if name == "sandbox":
                    sb.reset()  # drop the previous round's blob from disk
                    url = requests.post(f"{sb.api_url}/files/generateuploadurl", headers=h,
                                        timeout=10).json()["uploadURL"]
                else:
                    url = az.blob_sas_url("bench", f"round-{i}")
                times[name].append(curl_put(url, data))
                print(f"  round {i + 1} {name}: {times[name][-1]:.2f} s", file=sys.stderr)
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=int, default=10, help="wrk duration per request kind")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--put-mib", type=int, default=1024)
    p.add_argument("--put-rounds", type=int, default=3)
    p.add_argument("--skip-api", action="store_true")
    p.add_argument("--skip-put", action="store_true")
    args = p.parse_args(argv)
    print(f"machine: {os.cpu_count()} cores; {time.strftime('%Y-%m-%d %H:%M')}")
    with tempfile.TemporaryDirectory(prefix="sandbox-bench-", dir=REPO / "var"
                                     if (REPO / "var").is_dir() else None) as d:
        tmp = Path(d)
        if not args.skip_api:
            api = bench_api(args.seconds, args.connections, tmp)
            print(f"\n| request (sandbox on core 0; wrk -t1 -c{args.connections} "
                  f"-d{args.seconds}s on core 1) | requests/s (wrk) | requests per CPU-second |")
            print("|---|---:|---:|")
            for name, (rps, per_cpu) in api.items():
                print(f"| {name} | {rps:,.0f} | {per_cpu:,.0f} |")
        if not args.skip_put:
            times = bench_put(args.put_mib, args.put_rounds, tmp)
            print(f"\n| `curl -T` {args.put_mib} MiB | runs (s) | median (s) | MiB/s (median) |")
            print("|---|---|---:|---:|")
            for name, ts in times.items():
                med = statistics.median(ts)
                print(f"| {name} | {', '.join(f'{t:.2f}' for t in ts)} | {med:.2f} | "
                      f"{args.put_mib / med:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
