"""Benchmark: N small-file jobs through the whole pipeline vs a direct client, in one run.

Both face the same sandbox with the same added latency per request (default 20 ms) and the same
total concurrency (workers x threads). The direct client makes the same three requests per file
(generate URL, PUT, link) from a thread pool with no queue, records or retries: the floor that
shows what the pipeline's durability costs. The sandbox's rate limits are set far above the load
so that neither side is throttled. The fleet runs a warm-up batch (--warmup, untimed) first, as
the direct client's run starts on a machine with nothing else starting up.

The pipeline's time includes staging: `enqueue_many` copies every file into STAGING_DIR before
the batch's messages go out (0.66-1.06 s of a ~7 s run for 500 files of 20 KB here, mostly
mkdir and create right after the sandbox deleted the previous run's blobs; 0.24 s on a quiet
disk), while the direct client reads the files where they are.

    .venv/bin/python -m ops.bench.pipeline_vs_direct --jobs 500 --workers 2 --concurrency 8
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests

from ops.demo_files import random_file
from ops.local_fleet import FleetOptions, LocalFleet, SandboxOptions
from producers.client import Uploads
from producers.keys import ACTIVE_KEY
from producers.spec import JobSpec

API_KEY = "bench-key"
HIGH_PER_MINUTE, HIGH_PER_SECOND = 1_000_000, 100_000


def direct_upload(session: requests.Session, api: str, path: Path, task_id: str) -> None:
    auth = {"Authorization": f"Bearer {API_KEY}"}
    r = session.post(f"{api}/files/generateuploadurl", headers=auth, timeout=30)
    r.raise_for_status()
    body = {k.lower(): v for k, v in r.json().items()}
    with path.open("rb") as fh:
        put = requests.put(
            body["uploadurl"],
            data=fh,
            headers={"x-ms-blob-type": "BlockBlob", "Content-Type": "application/octet-stream"},
            timeout=30,
        )
    put.raise_for_status()
    link = session.post(
        f"{api}/tasks/{task_id}/files/byuploadid",
        json={"uploadId": body["uploadid"], "fileName": path.name},
        headers=auth,
        timeout=30,
    )
    link.raise_for_status()


def run_direct(api: str, files: list[Path], task_id: str, concurrency: int) -> float:
    sessions: dict[int, requests.Session] = {}

    def one(path: Path) -> None:
        import threading

        s = sessions.setdefault(threading.get_ident(), requests.Session())
        direct_upload(s, api, path, task_id)

    started = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, files))
    return time.monotonic() - started


def run_pipeline(fleet: LocalFleet, files: list[Path], task_id: str) -> tuple[float, dict[str, int]]:
    """Seconds from the first enqueue until no job is left unfinished (one ZCARD of the index of
    unfinished jobs every 20 ms); the records' states are read afterwards, untimed. Waiting with
    `wait_many` (every unfinished record read every 0.1 s: 15,000 reads in a 500-job run) or by
    polling the sandbox's file list took CPU from the workers on the same two cores."""
    up = Uploads(fleet.shared_settings(fleet.env))
    started = time.monotonic()
    jobs = up.enqueue_many([JobSpec(f, f"task:{task_id}") for f in files])
    deadline = started + 1800
    while up.redis.zcard(ACTIVE_KEY) and time.monotonic() < deadline:
        time.sleep(0.02)
    seconds = time.monotonic() - started
    final = up.wait_many([j.id for j in jobs], timeout=120, poll=0.5)
    states: dict[str, int] = {}
    for j in final:
        states[j.state.value] = states.get(j.state.value, 0) + 1
    up.close()
    return seconds, states


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--jobs", type=int, default=500)
    p.add_argument("--size", type=int, default=20_000, help="bytes per file")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=8, help="threads per worker")
    p.add_argument("--latency-ms", type=float, default=20.0)
    p.add_argument(
        "--warmup", type=int, default=32, help="jobs through the fleet before the timed run (0: none)"
    )
    args = p.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench-pipeline-", dir="var" if Path("var").is_dir() else None))
    # The workers start after the direct run: it has the machine to itself.
    fleet = LocalFleet(
        FleetOptions(
            root=root,
            workers=0,
            concurrency=args.concurrency,
            loglevel=os.environ.get("BENCH_LOGLEVEL", "WARNING"),
            node_name="bench{n}@%h",
            env={
                "AWORK_RATE_LIMIT_PER_MINUTE": str(HIGH_PER_MINUTE),
                "AWORK_RATE_LIMIT_PER_SECOND": str(HIGH_PER_SECOND),
            },
            drop_env=("AWORK_",),
            sandbox=SandboxOptions(
                api_keys={API_KEY: "default"},
                admin_token="sandbox-admin",
                args=[
                    f"--latency-ms={args.latency_ms}",
                    f"--rate-limit-per-minute={HIGH_PER_MINUTE}",
                    f"--rate-limit-per-second={HIGH_PER_SECOND}",
                ],
            ),
            stop_grace=10,
        )
    )
    try:
        fleet.start()
        sandbox = fleet.sandbox
        assert sandbox is not None
        task_id = sandbox.seed("tasks", str(uuid.uuid4()))
        files = [random_file(root / "files" / f"f{i:05d}.bin", args.size) for i in range(args.jobs)]
        total = args.workers * args.concurrency

        direct_s = run_direct(sandbox.api_url, files, task_id, total)
        direct_files = len(sandbox.stats()["files"])
        sandbox.reset()

        fleet.add_workers(args.workers)
        fleet.wait_ready()
        if args.warmup:  # untimed: workers past their start-up, each thread's sessions open
            warm = [random_file(root / "warm" / f"w{i:05d}.bin", args.size) for i in range(args.warmup)]
            run_pipeline(fleet, warm, task_id)
            sandbox.reset()
        pipeline_s, states = run_pipeline(fleet, files, task_id)
        stats = sandbox.stats()
        result: dict[str, Any] = {
            "jobs": args.jobs,
            "size": args.size,
            "latency_ms": args.latency_ms,
            "concurrency": total,
            "direct_seconds": round(direct_s, 2),
            "direct_jobs_per_s": round(args.jobs / direct_s, 1),
            "direct_files": direct_files,
            "pipeline_seconds": round(pipeline_s, 2),
            "pipeline_jobs_per_s": round(args.jobs / pipeline_s, 1),
            "pipeline_states": states,
            "pipeline_files": len(stats["files"]),
            "ratio": round((args.jobs / pipeline_s) / (args.jobs / direct_s), 3),
        }
        print(f"{'':<10}{'seconds':>10}{'jobs/s':>10}")
        print(f"{'direct':<10}{result['direct_seconds']:>10}{result['direct_jobs_per_s']:>10}")
        print(f"{'pipeline':<10}{result['pipeline_seconds']:>10}{result['pipeline_jobs_per_s']:>10}")
        print(f"ratio pipeline/direct: {result['ratio']}")
        print(json.dumps(result))
        return 0
    finally:
        fleet.stop()
        if not os.environ.get("BENCH_KEEP"):
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
