"""`awork-uploads demo`: start the stack and send a realistic batch through it.

Small and medium files on every three-step target kind, profile images, one large file
(200 MiB by default), a multipart-only target, and two jobs meant to fail for good (an unknown
task). A live progress display, then a summary table and the Flower URL. Without --exit the
stack stays up for exploring until Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ops.demo_files import png_file, random_file
from ops.stack import Stack, StackConfig, print_banner, run_until_signal
from producers.client import Uploads
from producers.progress import ProgressDisplay, human_bytes
from producers.records import Job
from producers.spec import JobSpec

THREE_STEP = (
    ("task", "tasks"),
    ("project", "projects"),
    ("document", "documents"),
    ("tasktemplate", "tasktemplates"),
)
IMAGE_TARGETS = ("projects", "users", "companies")
MULTIPART = (("company", "companies"), ("user", "users"))


def build_batch(entities: dict[str, list[str]], files_dir: Path, jobs: int, large_mib: int) -> list[JobSpec]:
    """The demo's jobs: `jobs` small/medium files spread over the kinds, plus the fixed extras."""
    rng = random.Random(7)
    specs: list[JobSpec] = []
    for i in range(jobs):
        kind, plural = THREE_STEP[i % len(THREE_STEP)]
        size = rng.choice([2_000, 30_000, 250_000]) if i % 5 else rng.choice([1, 3, 6]) * 1024 * 1024
        path = random_file(files_dir / f"report-{i:03d}.bin", size)
        entity = entities[plural][i % len(entities[plural])]
        specs.append(JobSpec(path, f"{kind}:{entity}", description=f"demo file {i}"))
    for i, name in enumerate(IMAGE_TARGETS):
        path = png_file(files_dir / f"avatar-{name}.png", 64 + 16 * i, 64)
        specs.append(JobSpec(path, f"image:{name}/{entities[name][0]}"))
    for kind, plural in MULTIPART:
        path = random_file(files_dir / f"contract-{kind}.pdf", 120_000)
        specs.append(JobSpec(path, f"{kind}:{entities[plural][0]}"))
    if large_mib:
        big = random_file(files_dir / "site-video.mp4", large_mib * 1024 * 1024)
        specs.append(JobSpec(big, f"project:{entities['projects'][0]}", description="a large file"))
    for i in range(2):  # meant to fail: awork answers 404 not-found
        path = random_file(files_dir / f"orphan-{i}.txt", 5_000)
        specs.append(JobSpec(path, f"task:{uuid.uuid4()}", description="unknown task: must fail"))
    return specs


def summary(jobs: list[Job], seconds: float, stats: dict[str, Any] | None) -> dict[str, Any]:
    states = Counter(j.state.value for j in jobs)
    return {
        "jobs": len(jobs),
        "done": states.get("done", 0),
        "failed": states.get("failed", 0),
        "dead": states.get("dead", 0),
        "seconds": round(seconds, 2),
        "jobs_per_second": round(len(jobs) / seconds, 2) if seconds else None,
        "bytes": sum(j.size or 0 for j in jobs if j.state.value == "done"),
        "api_requests": (stats or {}).get("api_requests"),
        "rate_limited": (stats or {}).get("rate_limited"),
    }


def print_summary(jobs: list[Job], result: dict[str, Any], flower_url: str | None) -> None:
    print()
    print("Summary")
    print(f"  jobs          {result['jobs']}")
    print(f"  done          {result['done']}")
    print(f"  failed        {result['failed']}")
    print(f"  dead          {result['dead']}")
    print(f"  wall time     {result['seconds']:.1f} s")
    print(f"  jobs/s        {result['jobs_per_second']}")
    print(f"  uploaded      {human_bytes(result['bytes'])}")
    print(f"  API requests  {result['api_requests']}")
    print(f"  429s          {result['rate_limited']}")
    failures = [j for j in jobs if j.state.value in ("failed", "dead")]
    if failures:
        print("  failures:")
        for j in failures:
            e = j.error
            if e is not None:
                print(
                    f"    {j.file_name:<20} {j.target:<44} {j.state.value}: {e.code} "
                    f"(HTTP {e.status}, trace {e.trace_id}) {e.description}"
                )
    if flower_url:
        print(f"  Flower        {flower_url}")
    sys.stdout.flush()


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="awork-uploads demo", description=__doc__.split("\n")[0])
    p.add_argument("--jobs", type=int, default=40, help="small and medium files (default 40)")
    p.add_argument("--large-mib", type=int, default=200, help="size of the large file (0: none)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--data-dir", type=Path, default=Path("var"))
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--exit", action="store_true", help="stop the stack after the summary")
    p.add_argument("--json", action="store_true", help="end with one JSON line of counts")
    p.add_argument("--no-flower", action="store_true")
    return p.parse_args(list(argv))


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    config = StackConfig(
        workers=args.workers,
        concurrency=args.concurrency,
        data_dir=args.data_dir,
        flower=not args.no_flower,
    )
    if os.environ.get("AWORK_API_URL"):
        print("awork-uploads demo: runs against the sandbox; unset AWORK_API_URL", file=sys.stderr)
        return 2
    stack = Stack(config)
    try:
        stack.start()
        stack.wait_ready()
        if not args.json:
            print_banner(stack)
        files_dir = args.data_dir.resolve() / "demo-files"
        specs = build_batch(stack.sandbox.entities, files_dir, args.jobs, args.large_mib)
        assert stack.fleet is not None
        up = Uploads(stack.fleet.shared_settings(("REDIS_URL", "STAGING_DIR")))
        started = time.monotonic()
        jobs = up.enqueue_many(specs)
        display = None if args.json else ProgressDisplay(sys.stdout)
        final = up.wait_many(
            [j.id for j in jobs], timeout=args.timeout, on_update=display.update if display else None
        )
        seconds = time.monotonic() - started
        up.close()
        result = summary(final, seconds, stack.sandbox.stats())
        if not args.json:
            print_summary(final, result, stack.flower_url)
        if args.json:
            print(json.dumps(result), flush=True)
        if not args.exit:
            if not args.json:
                print("The stack stays up for exploring; Ctrl-C stops it.", flush=True)
            run_until_signal()
        expected_failures = 2
        ok = result["done"] == result["jobs"] - expected_failures and result["failed"] == expected_failures
        return 0 if ok else 1
    finally:
        stack.stop()
