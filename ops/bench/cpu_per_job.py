"""Benchmark: CPU time per small-file job of the worker and of Redis, beside two floors.

One run, one private Redis, one sandbox (no added latency, rate limits far above the load):

- pipeline: N jobs of SIZE bytes through one worker (threads pool, --concurrency threads);
  CPU per job of the worker process(es) and of redis-server, read from /proc/PID/stat
  (utime + stime), so load elsewhere on the machine does not skew it; Redis commands per job
  from the delta of INFO commandstats (enqueue included; the top commands are listed);
- direct: the same three awork requests per file (generate URL, PUT, link) from as many
  threads with `requests`, no queue and no records: CPU per job of that (this) process;
- floor: Celery's own cost for a chain of three no-op tasks on the same worker settings
  (producers.broker.celery_config, same pool and concurrency): stock, and "floor_patched" with
  the project's changes to Celery's own costs loaded (CELERY_PATCHES: kombu's bookkeeping without
  MULTI/EXEC, one Redis client per channel, task events in batches; no `task-sent` events), as the
  pipeline's worker runs.

    .venv/bin/python -m ops.bench.cpu_per_job --jobs 400 --size 2048

`--profile` samples the pipeline worker with py-spy (`pip install py-spy`) and prints the
frames where its CPU goes, by own time and by inclusive time:

    .venv/bin/python -m ops.bench.cpu_per_job --jobs 400 --profile --skip-direct --skip-floor

The CPU figures of a profiled run include the sampler's pauses; compare runs without it.

`--monitor N` adds a pass of N more jobs under Redis MONITOR (ops/bench/redis_monitor.py): the
commands clients sent a job (round trips, a script call counted once) apart from those the
scripts ran inside Redis, and each script's calls and size. Its CPU is not reported (MONITOR
costs Redis CPU of its own).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import requests
from celery import Celery, chain

from ops.bench.pipeline_vs_direct import direct_upload
from ops.bench.redis_monitor import Monitor
from ops.demo_files import random_file
from ops.local_fleet import ping_workers, worker_argv
from ops.processes import Child
from ops.redis_server import RedisServer, command_calls
from ops.sandbox.launcher import SandboxProcess
from producers.broker import celery_config
from producers.client import Uploads
from producers.config import SharedSettings
from producers.spec import JobSpec

API_KEY = "bench-key"
HIGH_PER_MINUTE, HIGH_PER_SECOND = 1_000_000, 100_000
NOOP_TASK = "bench.noop"
NOOP_DONE_KEY = "bench:noop:done"
TICKS = os.sysconf("SC_CLK_TCK")

# The modules that change what Celery itself costs a worker (kombu's bookkeeping, client reuse,
# task events in batches): loaded by the "patched" floor, not by the stock one.
CELERY_PATCHES = ["workers.kombu_fixes", "workers.event_batching"]


def noop(n: int, last: bool = False) -> None:
    """A step that does nothing; the chain's last one counts the chain as done."""
    if last:
        _done_counter().incr(NOOP_DONE_KEY)


def floor_app(name: str, patched: bool, redis_url: str | None = None) -> Celery:
    """The floor's Celery app (its worker's, or its publisher's). Patched as the fleet is: the
    CELERY_PATCHES loaded, and no `task-sent` events (workers/signals.py for what workers
    publish; the fleet's producers send pre-built messages)."""
    url = redis_url or os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    app = Celery(name, set_as_current=False, include=CELERY_PATCHES if patched else [])
    app.conf.update(celery_config(url))
    if patched:
        app.conf.task_send_sent_event = False
    app.task(name=NOOP_TASK, ignore_result=True)(noop)
    return app


# The apps of the floor's worker: `celery -A ops.bench.cpu_per_job:noop_app worker`.
noop_app = floor_app("bench-noop", patched=False)
patched_noop_app = floor_app("bench-noop-patched", patched=True)


_counter: list[redis.Redis] = []


def _done_counter() -> redis.Redis:
    if not _counter:
        _counter.append(redis.Redis.from_url(os.environ["REDIS_URL"]))
    return _counter[0]


# -- measuring -------------------------------------------------------------------------------
def _stat(pid: int) -> tuple[int, float]:
    """(parent pid, utime + stime in seconds) of one process."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / TICKS


def tree_cpu(pid: int) -> float:
    """CPU seconds used so far by `pid` and its live descendants."""
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)], cpu[int(entry.name)] = _stat(int(entry.name))
            except (OSError, ValueError):
                continue
    members, grew = {pid}, True
    while grew:
        found = {p for p, parent in parents.items() if parent in members} - members
        members |= found
        grew = bool(found)
    return sum(cpu.get(p, 0.0) for p in members)


@dataclass
class Meter:
    """CPU of the worker and of Redis, and Redis commands, between start() and stop()."""

    worker_pid: int
    redis_pid: int
    client: redis.Redis
    worker: float = 0.0
    redis: float = 0.0
    commands: Counter[str] | None = None

    def start(self) -> Meter:
        self._w, self._r = tree_cpu(self.worker_pid), tree_cpu(self.redis_pid)
        self._c = command_calls(self.client)
        return self

    def stop(self) -> Meter:
        self.commands = command_calls(self.client) - self._c
        self.worker = tree_cpu(self.worker_pid) - self._w
        self.redis = tree_cpu(self.redis_pid) - self._r
        return self

    def row(self, jobs: int) -> dict[str, Any]:
        assert self.commands is not None
        total = sum(self.commands.values())
        return {
            "worker_ms": round(1000 * self.worker / jobs, 2),
            "redis_ms": round(1000 * self.redis / jobs, 2),
            "total_ms": round(1000 * (self.worker + self.redis) / jobs, 2),
            "commands_per_job": round(total / jobs, 1),
            "top_commands": {k: round(v / jobs, 2) for k, v in self.commands.most_common(30)},
        }


# -- the worker ------------------------------------------------------------------------------
def launch_worker(app: str, env: dict[str, str], concurrency: int, log: Path, loglevel: str) -> Child:
    """One threads-pool worker of `app` with the stack's worker command line; returns when it
    answers ping."""
    argv = worker_argv(concurrency, f"bench-{uuid.uuid4().hex[:6]}@%h", loglevel)
    argv[argv.index("-A") + 1] = app
    child = Child("worker", argv, env, log).start()
    deadline = time.monotonic() + 60
    while ping_workers(env) < 1:
        if not child.alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the worker did not start; see {log}")
        time.sleep(0.3)
    return child


def _wait_until(done: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.2)


# -- the three runs --------------------------------------------------------------------------
def run_direct(api: str, files: list[Path], task_id: str, threads: int) -> dict[str, Any]:
    local = threading.local()

    def one(path: Path) -> None:
        if not hasattr(local, "session"):
            local.session = requests.Session()
        direct_upload(local.session, api, path, task_id)

    cpu, started = time.process_time(), time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, files))
    cpu, seconds = time.process_time() - cpu, time.monotonic() - started
    return {"cpu_ms": round(1000 * cpu / len(files), 2), "jobs_per_s": round(len(files) / seconds, 1)}


def run_pipeline(
    env: dict[str, str], redis_server: RedisServer, sandbox: SandboxProcess, files: list[Path],
    task_id: str, args: argparse.Namespace, profile_to: Path | None, monitor: bool = False,
) -> dict[str, Any]:  # fmt: skip
    worker = launch_worker("workers", env, args.concurrency, args.root / "logs" / "worker.log", args.loglevel)
    client = redis.Redis.from_url(redis_server.url)
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        up = Uploads(SharedSettings.from_env())
    finally:
        os.environ.clear()
        os.environ.update(saved)
    spy = None
    try:
        assert worker.pid is not None and redis_server.proc is not None
        if profile_to is not None:
            spy = start_profiler(worker.pid, profile_to)
        watch = Monitor("127.0.0.1", redis_server.port) if monitor else None
        meter = Meter(worker.pid, redis_server.proc.pid, client).start()
        started = time.monotonic()
        jobs = up.enqueue_many([JobSpec(f, f"task:{task_id}") for f in files])
        _wait_until(lambda: len(sandbox.stats()["files"]) >= len(files), 600, "the pipeline's links")
        seconds = time.monotonic() - started
        time.sleep(0.5)  # the last link's record write
        meter.stop()
        if watch is not None:
            tally = watch.stop()
            states = Counter(j.state.value for j in up.wait_many([j.id for j in jobs], timeout=60, poll=0.5))
            row = meter.row(len(files))
            counts = tally.per_job(len(files))
            return {"commands_per_job": row["commands_per_job"], **counts, "states": dict(states)}
        if spy is not None:
            stop_profiler(spy)
        states = Counter(j.state.value for j in up.wait_many([j.id for j in jobs], timeout=60, poll=0.5))
        return {**meter.row(len(files)), "jobs_per_s": round(len(files) / seconds, 1), "states": dict(states)}
    finally:
        if spy is not None and spy.poll() is None:
            spy.kill()
        up.close()
        worker.stop(grace=10)


def run_floor(
    env: dict[str, str], redis_server: RedisServer, jobs: int, args: argparse.Namespace, patched: bool = False
) -> dict[str, Any]:
    app = "patched_noop_app" if patched else "noop_app"
    worker = launch_worker(
        f"ops.bench.cpu_per_job:{app}",
        env,
        args.concurrency,
        args.root / "logs" / f"{app}.log",
        args.loglevel,
    )
    client = redis.Redis.from_url(redis_server.url)
    publisher = floor_app("bench-noop-publisher", patched, redis_server.url)
    try:
        assert worker.pid is not None and redis_server.proc is not None
        client.delete(NOOP_DONE_KEY)
        meter = Meter(worker.pid, redis_server.proc.pid, client).start()
        started = time.monotonic()
        for n in range(jobs):
            steps = [publisher.signature(NOOP_TASK, args=(n,), immutable=True) for _ in range(2)]
            last = publisher.signature(NOOP_TASK, args=(n,), kwargs={"last": True}, immutable=True)
            chain(*steps, last).apply_async()
        _wait_until(lambda: int(client.get(NOOP_DONE_KEY) or 0) >= jobs, 600, "the no-op chains")
        seconds = time.monotonic() - started
        meter.stop()
        return {**meter.row(jobs), "jobs_per_s": round(jobs / seconds, 1)}
    finally:
        publisher.close()
        worker.stop(grace=10)


# -- profiling -------------------------------------------------------------------------------
def start_profiler(pid: int, out: Path) -> subprocess.Popen[bytes]:
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if spy is None:
        raise SystemExit("--profile needs py-spy: .venv/bin/pip install py-spy")
    cmd = [
        spy,
        "record",
        "--pid",
        str(pid),
        "--rate",
        "200",
        "--gil",
        "--format",
        "raw",
        "--output",
        str(out),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.0)  # attached
    return proc


def stop_profiler(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGINT)  # py-spy writes its samples on Ctrl-C
    proc.wait(60)


def top_frames(raw: Path, limit: int) -> tuple[int, list[tuple[str, int]], list[tuple[str, int]]]:
    """From py-spy's collapsed stacks: (samples, frames by own samples, by inclusive samples).
    A frame is `function (file)`, its line numbers folded together."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [_fold(f) for f in stack.split(";")]
        n = int(count)
        total += n
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    return total, own.most_common(limit), inclusive.most_common(limit)


def _fold(frame: str) -> str:
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{name} ({path.replace(str(Path.cwd()) + '/', '')})"


def print_profile(raw: Path, limit: int) -> None:
    total, own, inclusive = top_frames(raw, limit)
    print(f"\nprofile of the pipeline worker: {total} samples (py-spy --gil: the thread holding the GIL)")
    for title, rows in (("own", own), ("inclusive", inclusive)):
        print(f"-- top frames by {title} samples")
        for frame, n in rows:
            print(f"{100 * n / max(total, 1):6.1f}%  {frame}")


# -- main ------------------------------------------------------------------------------------
def print_monitor(m: dict[str, Any]) -> None:
    print(
        f"\nunder MONITOR: {m['commands_per_job']} commands a job = {m['sent_per_job']} sent by clients"
        f" + {m['in_scripts_per_job']} run inside scripts"
    )
    print("sent a job: " + ", ".join(f"{k} {v}" for k, v in m["sent"].items()))
    for name, s in m["scripts"].items():
        calls, inside = s["calls_per_job"], s["commands_inside_per_call"]
        print(f"  {name:<22} {calls:>5} calls a job x {inside:>5} commands inside")


def print_table(result: dict[str, Any]) -> None:
    w = 15
    print(f"{'':<{w}}{'worker ms':>10}{'redis ms':>10}{'total ms':>10}{'cmds/job':>10}{'jobs/s':>10}")
    for name in ("pipeline", "floor", "floor_patched"):
        r = result.get(name)
        if r:
            print(
                f"{name:<{w}}{r['worker_ms']:>10}{r['redis_ms']:>10}{r['total_ms']:>10}"
                f"{r['commands_per_job']:>10}{r['jobs_per_s']:>10}"
            )
    p, f = result.get("pipeline"), result.get("floor_patched") or result.get("floor")
    if p and f:
        print(
            f"{'beyond':<{w}}{p['worker_ms'] - f['worker_ms']:>10.2f}{p['redis_ms'] - f['redis_ms']:>10.2f}"
            f"{p['total_ms'] - f['total_ms']:>10.2f}{p['commands_per_job'] - f['commands_per_job']:>10.1f}"
            f"{'':>10}  (pipeline minus the floor it runs on: what the steps add to Celery's own cost)"
        )
    d = result.get("direct")
    if d:
        print(f"{'direct':<{w}}{d['cpu_ms']:>10}{'-':>10}{d['cpu_ms']:>10}{'-':>10}{d['jobs_per_s']:>10}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--jobs", type=int, default=400)
    p.add_argument("--size", type=int, default=2048, help="bytes per file")
    p.add_argument("--concurrency", type=int, default=8, help="threads of the worker (and the direct client)")
    p.add_argument("--loglevel", default="INFO", help="the workers' log level")
    p.add_argument("--skip-direct", action="store_true")
    p.add_argument("--skip-floor", action="store_true")
    p.add_argument("--profile", action="store_true", help="sample the pipeline worker with py-spy")
    p.add_argument("--top", type=int, default=30, help="frames listed by --profile")
    p.add_argument("--monitor", type=int, default=0, metavar="N", help="N more jobs under Redis MONITOR")
    args = p.parse_args()

    args.root = Path(tempfile.mkdtemp(prefix="bench-cpu-", dir="var" if Path("var").is_dir() else None))
    redis_server = RedisServer(args.root / "redis").start()
    sandbox = SandboxProcess(
        api_keys={API_KEY: "default"},
        data_dir=args.root / "sandbox",
        extra_args=[
            f"--rate-limit-per-minute={HIGH_PER_MINUTE}",
            f"--rate-limit-per-second={HIGH_PER_SECOND}",
        ],
    )
    sandbox.start()
    result: dict[str, Any] = {"jobs": args.jobs, "size": args.size, "concurrency": args.concurrency}
    try:
        task_id = sandbox.seed("tasks", str(uuid.uuid4()))
        files = [random_file(args.root / "files" / f"f{i:05d}.bin", args.size) for i in range(args.jobs)]
        if not args.skip_direct:
            result["direct"] = run_direct(sandbox.api_url, files, task_id, args.concurrency)
            sandbox.reset()
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWORK_")}
        env.update(
            REDIS_URL=redis_server.url,
            STAGING_DIR=str(args.root / "staging"),
            AWORK_API_URL=sandbox.api_url,
            AWORK_API_KEY=API_KEY,
            AWORK_UPLOAD_HOSTS=sandbox.upload_host,
            AWORK_RATE_LIMIT_PER_MINUTE=str(HIGH_PER_MINUTE),
            AWORK_RATE_LIMIT_PER_SECOND=str(HIGH_PER_SECOND),
        )
        raw = args.root / "profile.txt" if args.profile else None
        result["pipeline"] = run_pipeline(env, redis_server, sandbox, files, task_id, args, raw)
        if not args.skip_floor:
            result["floor"] = run_floor(env, redis_server, args.jobs, args)
            result["floor_patched"] = run_floor(env, redis_server, args.jobs, args, patched=True)
        if args.monitor:
            sandbox.reset()
            watched = files[: args.monitor]
            result["monitor"] = run_pipeline(
                env, redis_server, sandbox, watched, task_id, args, None, monitor=True
            )
        print_table(result)
        if "monitor" in result:
            print_monitor(result["monitor"])
        print(json.dumps(result))
        if raw is not None:
            print_profile(raw, args.top)
        return 0
    finally:
        sandbox.stop()
        redis_server.stop()
        if not os.environ.get("BENCH_KEEP"):
            shutil.rmtree(args.root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
