"""Throughput at awork's rate limit: the fleet-wide limiter versus Celery's per-worker rate_limit.

Run by hand, not in the tests (about 7 minutes with the defaults):

    .venv/bin/python -m ops.bench.ratelimit_fleet [--minutes 2] [--workers 4] [--concurrency 8]
        [--per-minute 600] [--per-second 20] [--modes limiter,celery] [--json]

Each mode gets a fresh private redis-server, a fresh sandbox whose `default` workspace is limited
to --per-minute / --per-second (Kong-style fixed windows on the wall clock, like awork's
gateway), and --workers real `celery -A workers worker` processes (threads pool). The load:
3-step uploads of 1 KiB (generate URL, PUT, link: two API requests each), 100 at once and then
a steady feed of 1.2 times what the limit allows (6 uploads/s for 600/min), the same schedule
in both modes: the workspace stays saturated while the chains keep flowing (enqueuing
everything at once would put every generate step ahead of every link in the queue). It
measures what the sandbox saw in whole wall-clock minutes (awork's windows), starting with
the first minute that begins at least --warmup seconds after the load started:

- limiter: the shared limiter (workers/ratelimit.py), configured with the same limits
  (AWORK_RATE_LIMIT_PER_MINUTE / _PER_SECOND, default margin 0.97);
- celery: no shared limiter (AWORK_RATE_LIMITER=off, a switch that exists for this comparison
  only) and Celery's own per-worker `rate_limit` as the only control, set the way the Celery
  docs suggest for a shared budget: the limit divided by the number of workers, and split
  between the two API tasks because every upload runs each of them once
  (600/min over 4 workers = 150/min per worker = 75/m for awork.generate_upload_url and 75/m
  for awork.link_file). It is set with Celery's `rate_limit` remote control command, which
  updates Task.rate_limit in every worker exactly as the task option would. 429s are then
  retried per job (the step runner's countdown from ratelimit-reset), with no fleet-wide pause.

Printed per mode: accepted API requests per minute (mean of the measured minutes), that as a
fraction of the limit, the fraction of API requests answered 429, jobs done, and the
per-minute counts.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ops.local_fleet import FleetOptions, LocalFleet, SandboxOptions
from producers.contract import TASK_GENERATE_UPLOAD_URL, TASK_LINK_FILE

WORKSPACE = "default"
FILE_BYTES = 1024
INITIAL_JOBS = 100
FEED_FACTOR = 1.2  # uploads fed per second, relative to what the limit allows


@dataclass
class Result:
    mode: str
    limit_per_minute: int
    limit_per_second: int
    workers: int
    minutes: list[int] = field(default_factory=list)  # accepted requests in each measured minute
    requests: int = 0  # API requests in the measured minutes, 429s included
    rate_limited: int = 0  # of those, answered 429
    jobs: int = 0  # enqueued from the start to the end of the measured minutes
    jobs_done: int = 0  # by the end of the measured minutes
    run_requests: int = 0  # from the first request to the end (warm-up included)
    run_rate_limited: int = 0
    celery_rate_limit: str | None = None

    @property
    def per_minute(self) -> float:
        return sum(self.minutes) / len(self.minutes) if self.minutes else 0.0

    @property
    def fraction_of_limit(self) -> float:
        return self.per_minute / self.limit_per_minute

    @property
    def fraction_429(self) -> float:
        return self.rate_limited / self.requests if self.requests else 0.0

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(
            per_minute=round(self.per_minute, 1),
            fraction_of_limit=round(self.fraction_of_limit, 4),
            fraction_429=round(self.fraction_429, 4),
        )
        return out


def start_fleet(root: Path, args: argparse.Namespace, extra_env: dict[str, str]) -> LocalFleet:
    """A private redis-server, the sandbox limited as awork would be, and N worker processes."""
    options = FleetOptions(
        root=root,
        workers=args.workers,
        concurrency=args.concurrency,
        loglevel="WARNING",
        node_name="bench{n}-{uid}@%h",
        env={
            "AWORK_RATE_LIMIT_PER_MINUTE": str(args.per_minute),
            "AWORK_RATE_LIMIT_PER_SECOND": str(args.per_second),
            **extra_env,
        },
        drop_env=("AWORK_", "FLOWER_", "WORKER_"),
        appendonly=False,
        sandbox=SandboxOptions(
            api_keys={"bench-" + secrets.token_hex(8): WORKSPACE},
            admin_token="admin-" + secrets.token_hex(8),
            args=[
                *("--rate-limit-per-minute", str(args.per_minute)),
                *("--rate-limit-per-second", str(args.per_second)),
            ],
        ),
        ready_timeout=90,
        stop_grace=10,
    )
    return LocalFleet(options).start()


def counts(fleet: LocalFleet) -> tuple[int, int]:
    """(API requests, 429s) the sandbox has seen for the workspace."""
    assert fleet.sandbox is not None
    s = fleet.sandbox.stats()
    return (
        int(s["requests_by_workspace"].get(WORKSPACE, 0)),
        int(s["rate_limited_by_workspace"].get(WORKSPACE, 0)),
    )


def set_celery_rate_limits(env: dict[str, str], workers: int, per_minute: int) -> str:
    """Celery's per-worker rate_limit on both API tasks: the limit / workers / 2 tasks."""
    from celery import Celery

    from producers.broker import celery_config

    per_task = per_minute / workers / 2
    rate = f"{per_task:g}/m"
    app = Celery("bench-control", set_as_current=False)
    app.conf.update(celery_config(env["REDIS_URL"]))
    try:
        for task in (TASK_GENERATE_UPLOAD_URL, TASK_LINK_FILE):
            replies = app.control.rate_limit(task, rate, reply=True, timeout=3.0) or []
            if len(replies) < workers:
                raise RuntimeError(f"rate_limit {task}={rate}: {len(replies)} of {workers} workers replied")
    finally:
        app.close()
    return rate


def run_mode(mode: str, args: argparse.Namespace, root: Path) -> Result:
    extra = {"AWORK_RATE_LIMITER": "off"} if mode == "celery" else {}
    fleet = start_fleet(root / mode, args, extra)
    result = Result(mode, args.per_minute, args.per_second, args.workers)
    try:
        if mode == "celery":
            result.celery_rate_limit = set_celery_rate_limits(fleet.env, args.workers, args.per_minute)
        from producers.spec import JobSpec

        up = fleet.producer()
        assert fleet.sandbox is not None
        entity = fleet.sandbox.seed("tasks")
        jobs: list[Any] = []
        stop = threading.Event()

        def feed() -> None:
            """INITIAL_JOBS now, then FEED_FACTOR x the uploads per second the limit allows."""
            per_second = args.per_minute / 2 / 60 * FEED_FACTOR
            due, sent, started = float(INITIAL_JOBS), 0, time.monotonic()
            while not stop.is_set():
                n = int(due) - sent
                if n > 0:
                    specs = [
                        JobSpec(os.urandom(FILE_BYTES), to=f"task:{entity}", name=f"bench-{sent + i}.bin")
                        for i in range(n)
                    ]
                    jobs.extend(up.enqueue_many(specs))
                    sent += n
                stop.wait(0.5)
                due = INITIAL_JOBS + per_second * (time.monotonic() - started)

        feeder = threading.Thread(target=feed, name="feeder", daemon=True)
        t_load = time.time()
        feeder.start()
        first = (t_load + args.warmup) // 60 * 60 + 60  # the first whole minute after the warm-up
        _sleep_until(first)
        before = counts(fleet)
        marks = [before]
        for m in range(args.minutes):
            _sleep_until(first + 60 * (m + 1))
            marks.append(counts(fleet))
            (r0, l0), (r1, l1) = marks[-2], marks[-1]
            accepted = (r1 - l1) - (r0 - l0)
            result.minutes.append(accepted)
            print(
                f"[{mode}] minute {m + 1}: {r1 - r0} requests, {l1 - l0} x 429, {accepted} accepted",
                file=sys.stderr,
                flush=True,
            )
        stop.set()
        feeder.join(30)
        after = marks[-1]
        result.requests = after[0] - before[0]
        result.rate_limited = after[1] - before[1]
        result.run_requests, result.run_rate_limited = after
        result.jobs = len(jobs)
        result.jobs_done = sum(1 for j in up.statuses([j.id for j in jobs]) if j.state.value == "done")
    finally:
        fleet.stop()
    return result


def _sleep_until(t: float) -> None:
    while True:
        left = t - time.time()
        if left <= 0:
            return
        time.sleep(min(left, 1.0))


def table(results: list[Result]) -> str:
    head = (
        "mode",
        "requests/min",
        "of limit",
        "429s",
        "jobs done",
        "per minute (accepted)",
    )
    rows = [head]
    for r in results:
        rows.append(
            (
                r.mode if r.mode == "limiter" else f"celery rate_limit {r.celery_rate_limit}/task/worker",
                f"{r.per_minute:.0f}",
                f"{r.fraction_of_limit:.1%}",
                f"{r.fraction_429:.2%} ({r.rate_limited}/{r.requests})",
                f"{r.jobs_done}/{r.jobs}",
                " ".join(str(m) for m in r.minutes),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=int, default=2, help="whole wall-clock minutes measured per mode")
    ap.add_argument("--warmup", type=float, default=10.0, help="seconds of load before the first minute")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=8, help="threads per worker")
    ap.add_argument("--per-minute", type=int, default=600)
    ap.add_argument("--per-second", type=int, default=20)
    ap.add_argument("--modes", default="limiter,celery")
    ap.add_argument("--json", action="store_true", help="also print one JSON line per mode")
    args = ap.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in ("limiter", "celery") for m in modes):
        ap.error("--modes: limiter and/or celery")
    print(
        f"sandbox limits {args.per_minute}/min and {args.per_second}/s for one workspace; "
        f"{args.workers} workers x {args.concurrency} threads; {args.minutes} whole minute(s) per mode; "
        f"{os.cpu_count()} CPUs",
        flush=True,
    )
    results = []
    with tempfile.TemporaryDirectory(prefix="rl-bench-") as tmp:
        for mode in modes:
            results.append(run_mode(mode, args, Path(tmp)))
    print(table(results))
    if args.json:
        for r in results:
            print(json.dumps(r.to_json()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
