"""Fairness across workspaces on one fleet: does one workspace's backlog hold up another's upload?

Run by hand, not in the tests:

    .venv/bin/python -m ops.bench.fairness [--cases backlog,many,api] [--workers 2]
        [--concurrency 4] [--kib-per-s 1024] [--json]

Every case gets a fresh private redis-server, a fresh sandbox and --workers real
`celery -A workers worker` processes (threads pool, --concurrency threads each). Blob bodies are
paced per PUT stream by the sandbox (`--latency-ms 20 --window-kib K`: about --kib-per-s KiB/s
per stream, like a customer's upload link), so a transfer holds a worker thread the way a large
upload does. Figures come from the job records (created_at, finished_at, size).

- backlog: workspace `a` enqueues --backlog files of --big-kib KiB; once its transfers fill the
  fleet, workspace `b` enqueues 3 small files (--small-kib). Printed: b's time from enqueue to
  done (each file) against the same 3 files on the idle fleet, one transfer slot's turnover (one
  big file's PUT time), and a's throughput (bytes/s) in the window while b is running against
  a's throughput alone (the same length of window before b came).
- many: --many workspaces (the first with `share = 2`) each enqueue --per-ws files; over
  --window seconds after a warm-up, each workspace's bytes uploaded against its weighted share.
- api: workspace `a` holds --api-backlog jobs of 1 KiB at a 120/min awork limit, `b` enqueues
  20 small jobs: the time until b's are all done (the issue measured 5 s).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from ops.local_fleet import FleetOptions, LocalFleet, SandboxOptions
from ops.sandbox.launcher import SandboxProcess
from producers.client import Uploads
from producers.records import Job
from producers.spec import JobSpec

LATENCY_MS = 20
LOGLEVEL = os.environ.get("BENCH_LOGLEVEL", "WARNING")  # the workers' log level (logs/ of the run)
FAIR_SHARE = "on"  # --fair off: the workers' AWORK_FAIR_SHARE, for a comparison


@dataclass
class Bench:
    root: Path
    workspaces: dict[str, int]  # name -> share (weight)
    workers: int
    concurrency: int
    kib_per_s: int
    sandbox_args: list[str] = field(default_factory=list)
    extra_toml: dict[str, str] = field(default_factory=dict)  # name -> more lines of its table
    fleet: LocalFleet | None = None
    uploads: Uploads | None = None

    def start(self) -> Bench:
        keys = {f"key-{n}-{secrets.token_hex(6)}": n for n in self.workspaces}
        window = self.kib_per_s * LATENCY_MS / 1000
        toml = []
        env: dict[str, str] = {}
        for key, name in keys.items():
            var = f"KEY_{name.upper().replace('-', '_')}"
            env[var] = key
            table = f'[workspaces.{name}]\napi_key_env = "{var}"\nshare = {self.workspaces[name]}\n'
            toml.append(table + self.extra_toml.get(name, ""))
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "workspaces.toml").write_text("\n".join(toml))
        env.update(
            AWORK_WORKSPACES_FILE=str(self.root / "workspaces.toml"),
            # one PUT per file: the pacing is per stream
            AWORK_SINGLE_PUT_THRESHOLD=str(256 * 1024 * 1024),
            AWORK_FAIR_SHARE=FAIR_SHARE,
        )
        sandbox_args = ["--latency-ms", str(LATENCY_MS), "--window-kib", str(window), *self.sandbox_args]
        self.fleet = LocalFleet(
            FleetOptions(
                root=self.root,
                workers=self.workers,
                concurrency=self.concurrency,
                loglevel=LOGLEVEL,
                node_name="bench{n}-{uid}@{host}",
                env=env,
                sandbox=SandboxOptions(keys, "admin-" + secrets.token_hex(6), sandbox_args, worker_key=False),
                stop_grace=10,
            )
        ).start()
        self.uploads = self.fleet.producer()
        return self

    @property
    def sandbox(self) -> SandboxProcess:
        assert self.fleet is not None and self.fleet.sandbox is not None
        return self.fleet.sandbox

    def stop(self) -> None:
        if self.fleet is not None:
            self.fleet.stop()

    def enqueue(self, ws: str, n: int, kib: int, tag: str) -> list[Job]:
        assert self.uploads is not None
        task = str(uuid.uuid4())
        self.sandbox.seed("tasks", task)
        specs = [JobSpec(os.urandom(kib * 1024), f"task:{task}", ws, name=f"{tag}-{i}.bin") for i in range(n)]
        return self.uploads.enqueue_many(specs)

    def records(self, jobs: Sequence[Job]) -> list[dict[str, str]]:
        assert self.uploads is not None
        return [r or {} for r in self.uploads.store.get_many([j.id for j in jobs])]

    def wait(self, jobs: Sequence[Job], timeout: float) -> list[dict[str, str]]:
        assert self.uploads is not None
        self.uploads.wait_many([j.id for j in jobs], timeout=timeout, poll=0.1)
        return self.records(jobs)

    def client(self) -> redis.Redis:
        assert self.fleet is not None
        return self.fleet.redis_client()


def _f(record: dict[str, str], name: str) -> float:
    return float(record.get(name) or 0)


def _bytes_done_between(records: Sequence[dict[str, str]], start: float, end: float) -> int:
    return sum(
        int(r.get("size") or 0)
        for r in records
        if r.get("state") == "done" and start <= _f(r, "finished_at") < end
    )


def case_backlog(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    per_min = args.a_per_minute
    bench = Bench(
        root,
        {"a": 1, "b": 1},
        args.workers,
        args.concurrency,
        args.kib_per_s,
        sandbox_args=["--workspace-rate-limit", f"a={per_min}/50"],
        extra_toml={"a": f"per_minute = {per_min}\n"},
    ).start()
    try:
        idle_small = bench.enqueue("b", 3, args.small_kib, "idle")
        t0 = time.time()
        done = bench.wait(idle_small, 120)
        idle_seconds = max(_f(r, "finished_at") for r in done) - t0
        slot_seconds = args.big_kib / args.kib_per_s
        a_jobs = bench.enqueue("a", args.backlog, args.big_kib, "a")
        a_started = time.time()
        # a's transfer throughput (bytes sent, from the records' progress) alone, in a window
        # after its start-up, then in as long a window from the moment b enqueues
        window = max(1.0, args.lead - 2 * slot_seconds)
        time.sleep(args.lead - window)
        s0, t0 = _bytes_sent(bench, a_jobs), time.time()
        time.sleep(window)
        s1, t1 = _bytes_sent(bench, a_jobs), time.time()
        b_jobs = [] if args.control else bench.enqueue("b", 3, args.small_kib, "b")
        b_enqueued = time.time()
        b_records = bench.wait(b_jobs, args.backlog * slot_seconds + 120)
        b_done = max((_f(r, "finished_at") for r in b_records), default=b_enqueued)
        b_seconds = b_done - b_enqueued
        a_left = sum(1 for r in bench.records(a_jobs) if r.get("state") != "done")
        time.sleep(max(0.0, t1 + window - time.time()))
        s2, t2 = _bytes_sent(bench, a_jobs), time.time()
        before, during = (s1 - s0) / (t1 - t0), (s2 - s1) / (t2 - t1)
        return {
            "case": "backlog",
            "workers": args.workers,
            "concurrency": args.concurrency,
            "kib_per_s_per_put": args.kib_per_s,
            "a_backlog": args.backlog,
            "a_per_minute": per_min,
            "a_file_kib": args.big_kib,
            "b_file_kib": args.small_kib,
            "b_idle_fleet_seconds": round(idle_seconds, 2),
            "slot_turnover_seconds": round(slot_seconds, 2),
            "b_seconds_behind_a": round(b_seconds, 2),
            "b_bound_seconds": round(2 * idle_seconds + slot_seconds, 2),
            "a_jobs_not_done_when_b_done": a_left,
            "a_started_seconds_before_b": round(b_enqueued - a_started, 2),
            "a_window_seconds": round(window, 2),
            "a_bytes_per_s_before_b": round(before),
            "a_bytes_per_s_while_b": round(during),
            "a_throughput_change": round(during / before - 1, 3) if before else None,
        }
    finally:
        bench.stop()


def _bytes_sent(bench: Bench, jobs: Sequence[Job]) -> int:
    return sum(int(r.get("bytes_sent") or 0) for r in bench.records(jobs))


def case_many(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    shares = {f"ws{i:02d}": (2 if i == 0 else 1) for i in range(args.many)}
    bench = Bench(root, shares, args.workers, args.concurrency, args.kib_per_s).start()
    try:
        jobs = {ws: bench.enqueue(ws, args.per_ws, args.big_kib, ws) for ws in shares}
        time.sleep(args.warmup)
        start = time.time()
        time.sleep(args.window)
        end = time.time()
        got = {ws: _bytes_done_between(bench.records(j), start, end) for ws, j in jobs.items()}
        unfinished = {
            ws: sum(1 for r in bench.records(j) if r.get("state") != "done") for ws, j in jobs.items()
        }
        total = sum(got.values())
        weights = sum(shares.values())
        rows = {}
        for ws, n in got.items():
            expected = total * shares[ws] / weights
            rows[ws] = {
                "share": shares[ws],
                "bytes": n,
                "expected_bytes": round(expected),
                "ratio": round(n / expected, 3) if expected else None,
                "left_at_end": unfinished[ws],
            }
        ratios = [r["ratio"] for r in rows.values() if r["ratio"] is not None]
        return {
            "case": "many",
            "workers": args.workers,
            "concurrency": args.concurrency,
            "kib_per_s_per_put": args.kib_per_s,
            "workspaces": args.many,
            "files_per_workspace": args.per_ws,
            "file_kib": args.big_kib,
            "window_seconds": args.window,
            "total_bytes_per_s": round(total / (end - start)),
            "ratio_min": min(ratios) if ratios else None,
            "ratio_max": max(ratios) if ratios else None,
            "all_backlogged_at_end": all(v > 0 for v in unfinished.values()),
            "per_workspace": rows,
        }
    finally:
        bench.stop()


def case_api(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    bench = Bench(
        root,
        {"a": 1, "b": 1},
        args.workers,
        args.concurrency,
        args.kib_per_s,
        sandbox_args=["--workspace-rate-limit", "a=120/50"],
        extra_toml={"a": "per_minute = 120\n"},  # the workers know a's plan too
    ).start()
    try:
        a_jobs = bench.enqueue("a", args.api_backlog, 1, "a")
        time.sleep(5)
        b_jobs = bench.enqueue("b", 20, 1, "b")
        t0 = time.time()
        b_records = bench.wait(b_jobs, 300)
        b_seconds = max(_f(r, "finished_at") for r in b_records) - t0
        a_left = sum(1 for r in bench.records(a_jobs) if r.get("state") != "done")
        return {
            "case": "api",
            "workers": args.workers,
            "concurrency": args.concurrency,
            "a_backlog": args.api_backlog,
            "a_per_minute": 120,
            "b_jobs": 20,
            "b_seconds": round(b_seconds, 2),
            "a_jobs_not_done_when_b_done": a_left,
        }
    finally:
        bench.stop()


CASES = {"backlog": case_backlog, "many": case_many, "api": case_api}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ops.bench.fairness", description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default="backlog,many,api")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--kib-per-s", type=int, default=1024, help="pace of one PUT stream")
    p.add_argument("--backlog", type=int, default=200, help="a's transfers in the backlog case")
    p.add_argument("--a-per-minute", type=int, default=1000, help="a's awork limit in the backlog case")
    p.add_argument("--control", action="store_true", help="backlog case without b: a's windows alone")
    p.add_argument("--big-kib", type=int, default=2048)
    p.add_argument("--small-kib", type=int, default=64)
    p.add_argument("--lead", type=float, default=10.0, help="seconds between a's enqueue and b's")
    p.add_argument("--many", type=int, default=20)
    p.add_argument("--per-ws", type=int, default=40)
    p.add_argument("--warmup", type=float, default=15.0)
    p.add_argument("--window", type=float, default=60.0)
    p.add_argument("--api-backlog", type=int, default=200)
    p.add_argument("--fair", choices=("on", "off"), default="on", help="AWORK_FAIR_SHARE of the workers")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    global FAIR_SHARE
    FAIR_SHARE = args.fair
    out = []
    for name in args.cases.split(","):
        with tempfile.TemporaryDirectory(prefix=f"awork-fair-{name}-") as tmp:
            result = CASES[name.strip()](args, Path(tmp))
        out.append(result)
        print(json.dumps(result) if args.json else json.dumps(result, indent=2), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
