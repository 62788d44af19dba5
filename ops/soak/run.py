"""The fault soak: many uploads through a real fleet while everything that can fail, fails.

    python -m ops.soak --jobs 500      # the short form (tests/test_soak.py runs it)
    python -m ops.soak --jobs 2000     # the long form

It starts its own redis-server (AOF on), the sandbox with faults on every route, and N real
`celery -A workers worker` processes, then:

- enqueues the jobs at a steady pace (mixed sizes: small, medium and multi-block files; targets
  with awork's byuploadid route and with the one-request multipart route), a few of them on
  purpose to an entity awork does not have (they must end `failed`, 404 not-found);
- sandbox faults: `--fault-rate` (3%) each of 500, 503, 429 and dropped connections on every
  route (blob host included), plus drop_after / 500_after (the request is processed, the
  answer lost) on the link and multipart routes, duplicate-on-relink on, short upload URL
  lifetimes; seeded by `--seed`;
- SIGKILLs a random worker every ~`--kill-every` seconds and starts it again (the first worker
  is spared, so its memory can be watched over the whole run);
- SIGKILLs Redis once, when 60% of the jobs are enqueued, and starts it on the same AOF file;
  every worker must ride that out (one that exits by itself fails the soak).

Pass: every job done, or failed for the injected reason; the sandbox holds exactly one file per
done job (same name, size and MD5) and nothing else; no upload id linked twice; the staged
bytes of done jobs are gone. The last line printed gives the counts and PASS or FAIL; the exit
status is 0 only on PASS.

Targets without a file list in awork (companies, profile images) are left out: there a link or
multipart request whose answer was lost cannot be checked before it is sent again (see
ops/soak/README.md), so duplicate-on-relink would rightly make second files.

The workers run with short recovery timings (lock TTL 10 s, sweeper every 2 s) and retry
backoff (0.5 s base, 5 s cap) so that a soak takes minutes, not hours; the mechanisms are the
ones production uses, only the clocks are faster.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from ops.local_fleet import FleetOptions, FleetWorker, LocalFleet, SandboxOptions
from ops.processes import Child
from ops.redis_server import RedisServer
from ops.sandbox.launcher import SandboxProcess
from producers import keys as key_names
from producers.client import PublishFailed, RedisUnavailable, Uploads
from producers.spec import JobSpec

API_KEY = "soak-key"
ADMIN_TOKEN = "soak-admin"
THREE_STEP = ("tasks", "projects", "documents", "tasktemplates")
MULTIPART = ("users", "workspaces", "projecttemplates")
KIND = {
    "tasks": "task",
    "projects": "project",
    "documents": "document",
    "tasktemplates": "tasktemplate",
    "users": "user",
    "workspaces": "workspace",
    "projecttemplates": "projecttemplate",
}
WORKER_ENV = {
    # blocks: 64 KiB, and anything above 256 KiB goes up in blocks
    "AWORK_SINGLE_PUT_THRESHOLD": str(256 * 1024),
    "AWORK_BLOCK_SIZE": str(64 * 1024),
    "AWORK_PARALLEL_BLOCKS": "4",
    # an enterprise plan (the sandbox is told the same)
    "AWORK_RATE_LIMIT_PER_MINUTE": "3000",
    "AWORK_RATE_LIMIT_PER_SECOND": "50",
    # faster clocks, same mechanisms
    "AWORK_RETRY_BASE_SECONDS": "0.5",
    "AWORK_RETRY_MAX_SECONDS": "5",
    "AWORK_MAX_ATTEMPTS": "10",
    "AWORK_READ_TIMEOUT": "30",
    "AWORK_LOCK_TTL_SECONDS": "10",
    "AWORK_HEARTBEAT_SECONDS": "2",
    "AWORK_SWEEPER_INTERVAL": "2",
    "AWORK_SWEEPER_STALL": "6",
    "AWORK_SWEEPER_COOLDOWN": "15",
    "AWORK_SWEEPER_LOST_COUNTDOWN": "20",
    "AWORK_SWEEPER_UNPUBLISHED": "10",
    "AWORK_SWEEPER_IDLE": "30",
    "AWORK_SHUTDOWN_GRACE": "5",
    "AWORK_RECORD_TTL": "86400",
}


@dataclass
class Config:
    jobs: int = 500
    workers: int = 3
    concurrency: int = 4
    seed: int = 1234
    rate: float = 6.0  # jobs enqueued per second
    kill_every: float = 15.0
    fault_rate: float = 0.03
    url_lifetime: float = 6.0
    fail_jobs: int = 0  # 0: 1% of the jobs, at least 3
    timeout: float = 0.0  # 0: 300 s + 0.5 s a job
    appendfsync: str = "always"
    data_dir: Path | None = None
    keep: bool = False

    @property
    def expected_failures(self) -> int:
        return self.fail_jobs or max(3, self.jobs // 100)

    @property
    def deadline_seconds(self) -> float:
        return self.timeout or 300.0 + 0.5 * self.jobs


@dataclass
class Planned:
    index: int
    path: Path
    to: str
    entity_type: str
    entity_id: str
    name: str
    size: int
    md5: str
    meant_to_fail: bool


@dataclass
class Outcome:
    ok: bool
    problems: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    last_line: str = ""


def sandbox_faults(cfg: Config) -> dict[str, Any]:
    p = cfg.fault_rate
    every = {"500": p, "503": p, "429": p, "drop": p}
    lost_answer = {**every, "drop_after": p, "500_after": p}
    return {
        "seed": cfg.seed,
        "duplicate_on_relink": True,
        "upload_url_lifetime_s": cfg.url_lifetime,
        "routes": {"*": every, "link": lost_answer, "multipart": lost_answer},
    }


class Soak:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.root = cfg.data_dir or Path(tempfile.mkdtemp(prefix="awork-soak-"))
        self.fleet = LocalFleet(self.fleet_options())
        self.kills = 0
        self.self_exits: list[str] = []
        self.redis_restarts = 0
        self.publish_errors = 0
        self.job_ids: dict[str, Planned] = {}
        self.enqueued = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._up: Uploads | None = None

    def fleet_options(self) -> FleetOptions:
        sandbox_args = [
            "--seed", str(self.cfg.seed),
            "--rate-limit-per-minute", "3000", "--rate-limit-per-second", "50",
            "--faults-json", json.dumps(sandbox_faults(self.cfg)),
        ]  # fmt: skip
        return FleetOptions(
            root=self.root,
            workers=self.cfg.workers,
            concurrency=self.cfg.concurrency,
            node_name="soak{n}-{uid}@%h",
            env={**WORKER_ENV, "PYTHONUNBUFFERED": "1"},
            drop_env=("AWORK_", "FLOWER_", "REDIS_URL"),
            appendfsync=self.cfg.appendfsync,
            sandbox=SandboxOptions({API_KEY: "default"}, ADMIN_TOKEN, sandbox_args),
            ready_timeout=90,
        )

    # -- setup -------------------------------------------------------------------------------
    def start(self) -> None:
        self.fleet.start()
        self._up = self.fleet.producer(redis_retry_seconds=20.0)

    @property
    def env(self) -> dict[str, str]:
        return self.fleet.env

    @property
    def workers(self) -> list[FleetWorker]:
        return self.fleet.workers

    @property
    def sandbox(self) -> SandboxProcess | None:
        return self.fleet.sandbox

    @property
    def redis(self) -> RedisServer | None:
        return self.fleet.redis

    @property
    def up(self) -> Uploads:
        assert self._up is not None
        return self._up

    def stop(self) -> None:
        self._stop.set()
        self.fleet.stop()
        if not self.cfg.keep and self.cfg.data_dir is None:
            shutil.rmtree(self.root, ignore_errors=True)

    # -- the plan ----------------------------------------------------------------------------
    def plan(self) -> list[Planned]:
        """Entities (a few jobs each), files of mixed sizes, and the jobs meant to fail."""
        assert self.sandbox is not None
        rng = self.rng
        n_entities = max(10, self.cfg.jobs // 4)
        types = [rng.choice(THREE_STEP if rng.random() < 0.75 else MULTIPART) for _ in range(n_entities)]
        entities = [(t, str(uuid.UUID(int=rng.getrandbits(128), version=4))) for t in types]
        self.sandbox.seed_many([{"type": t, "id": i} for t, i in entities])
        failing = set(rng.sample(range(self.cfg.jobs), self.cfg.expected_failures))
        src = self.root / "src"
        src.mkdir(exist_ok=True)
        out: list[Planned] = []
        for i in range(self.cfg.jobs):
            if i in failing:
                etype = "tasks" if len(out) % 2 else "users"
                eid = str(uuid.UUID(int=rng.getrandbits(128), version=4))  # never seeded
            else:
                etype, eid = rng.choice(entities)
            r = rng.random()
            if r < 0.6:
                size = rng.randint(1_000, 40_000)
            elif r < 0.85:
                size = rng.randint(50_000, 250_000)
            else:
                size = rng.randint(300_000, 900_000)  # 5 to 14 blocks of 64 KiB
            name = f"soak-{i:05d}.bin"
            out.append(
                Planned(i, src / name, f"{KIND[etype]}:{eid}", etype, eid, name, size, "", i in failing)
            )
        return out

    def _write(self, p: Planned) -> None:
        data = random.Random(f"{self.cfg.seed}/{p.index}").randbytes(p.size)
        p.md5 = hashlib.md5(data).hexdigest()
        p.path.write_bytes(data)

    # -- the actors --------------------------------------------------------------------------
    def produce(self, planned: list[Planned]) -> None:
        """Enqueue at a steady pace, in small batches; on a publish failure, enqueue again only
        what left nothing behind."""
        batch = max(1, int(self.cfg.rate // 4))
        interval = batch / self.cfg.rate
        for start in range(0, len(planned), batch):
            if self._stop.is_set():
                return
            began = time.monotonic()
            chunk = planned[start : start + batch]
            for p in chunk:
                self._write(p)
            todo = chunk
            while todo and not self._stop.is_set():
                try:
                    jobs = self.up.enqueue_many([JobSpec(p.path, p.to, name=p.name) for p in todo])
                except PublishFailed as exc:
                    self.publish_errors += 1
                    gone = set(exc.published_ids) | set(exc.pending_ids)
                    for job_id in gone:
                        record = self.up.store.get(job_id) or {}
                        match = [p for p in todo if p.name == record.get("file_name")]
                        if match:
                            self._register(job_id, match[0])
                    names = {self.job_ids[j].name for j in gone if j in self.job_ids}
                    todo = [p for p in todo if p.name not in names]
                    time.sleep(0.5)
                    continue
                except RedisUnavailable:
                    self.publish_errors += 1
                    time.sleep(0.5)
                    continue
                for job, p in zip(jobs, todo, strict=True):
                    self._register(job.id, p)
                todo = []
            for p in chunk:
                p.path.unlink(missing_ok=True)  # the producer staged its own copy
            self._stop.wait(max(0.0, interval - (time.monotonic() - began)))

    def _register(self, job_id: str, p: Planned) -> None:
        with self._lock:
            if job_id not in self.job_ids:
                self.job_ids[job_id] = p
                self.enqueued += 1

    def killer(self) -> None:
        """SIGKILL a random worker (never the first) every ~kill_every seconds, start it again."""
        rng = random.Random(f"{self.cfg.seed}/killer")
        while not self._stop.wait(self.cfg.kill_every * rng.uniform(0.8, 1.2)):
            candidates = list(range(1, len(self.workers)))
            if not candidates:
                return
            i = rng.choice(candidates)
            with self._lock:
                self.workers[i].kill()
                self.kills += 1
                self.fleet.restart(self.workers[i])

    def watch_workers(self) -> None:
        """A worker that exits without being killed fails the soak (they must ride out a Redis
        restart); it is started again so the run can finish."""
        with self._lock:
            for w in list(self.workers):
                if not w.alive():
                    code = w.proc.returncode if w.proc else None
                    self.self_exits.append(f"{w.name} (exit {code})")
                    print(f"soak: {w.name} exited by itself (status {code}); starting it again", flush=True)
                    self.fleet.restart(w)

    def restart_redis(self) -> None:
        assert self.redis is not None
        self.redis.restart()  # SIGKILL, then start on the same port and AOF file
        self.redis_restarts += 1

    # -- measurements ------------------------------------------------------------------------
    def redis_memory(self) -> int:
        assert self.redis is not None
        client = redis.Redis.from_url(self.redis.url)
        try:
            return int(client.info("memory")["used_memory"])
        finally:
            client.close()

    @staticmethod
    def rss_kib(child: Child) -> int:
        try:
            for line in Path(f"/proc/{child.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        except OSError:
            pass
        return 0

    # -- the run -----------------------------------------------------------------------------
    def run(self) -> Outcome:
        cfg = self.cfg
        began = time.monotonic()
        self.start()
        planned = self.plan()
        mem_start = self.redis_memory()
        rss_start = self.rss_kib(self.workers[0])
        print(
            f"soak: {cfg.jobs} jobs ({cfg.expected_failures} meant to fail), {cfg.workers} workers x "
            f"{cfg.concurrency} threads, seed {cfg.seed}, faults {cfg.fault_rate:.0%} per kind, "
            f"URL lifetime {cfg.url_lifetime:.0f} s; redis used_memory {mem_start / 1e6:.1f} MB, "
            f"worker-1 RSS {rss_start / 1024:.0f} MiB; data in {self.root}",
            flush=True,
        )
        producer = threading.Thread(target=self.produce, args=(planned,), name="producer", daemon=True)
        killer = threading.Thread(target=self.killer, name="killer", daemon=True)
        producer.start()
        killer.start()
        deadline = began + cfg.deadline_seconds
        last_print = 0.0
        mem_peak = mem_start
        counts: Counter[str] = Counter()
        mem_now = mem_start
        while True:
            time.sleep(2)
            now = time.monotonic()
            self.watch_workers()
            if not self.redis_restarts and self.enqueued >= 0.6 * cfg.jobs:
                print(f"soak: t={now - began:.0f}s SIGKILL redis, start it on the same AOF", flush=True)
                self.restart_redis()
            try:
                counts = self.count_states()
                mem_now = self.redis_memory()
                mem_peak = max(mem_peak, mem_now)
            except (redis.exceptions.RedisError, RedisUnavailable):
                continue
            finished = counts["done"] + counts["failed"] + counts["dead"]
            if now - last_print > 10:
                last_print = now
                print(
                    f"soak: t={now - began:.0f}s enqueued={self.enqueued} "
                    + " ".join(f"{k}={v}" for k, v in sorted(counts.items()))
                    + f" kills={self.kills} redis_mb={mem_now / 1e6:.1f}"
                    + f" worker1_rss_mib={self.rss_kib(self.workers[0]) / 1024:.0f}",
                    flush=True,
                )
            if not producer.is_alive() and finished >= self.enqueued >= cfg.jobs:
                break
            if now > deadline:
                print("soak: deadline reached", flush=True)
                break
        self._stop.set()
        killer.join(timeout=5)
        producer.join(timeout=5)
        time.sleep(1)
        return self.check(
            began,
            {"mem_start": mem_start, "mem_peak": mem_peak, "rss_start": rss_start},
        )

    def count_states(self) -> Counter[str]:
        with self._lock:
            ids = list(self.job_ids)
        counts: Counter[str] = Counter()
        for i in range(0, len(ids), 500):
            for record in self.up.store.get_many(ids[i : i + 500]):
                counts[(record or {}).get("state", "missing")] += 1
        return counts

    # -- the verdict -------------------------------------------------------------------------
    def check(self, began: float, measured: dict[str, int]) -> Outcome:
        """The verdict: every job where it should be, nothing left behind; and the figures."""
        assert self.sandbox is not None
        records = self.records()
        stats = self.sandbox.stats()
        done = [j for j, r in records.items() if r.get("state") == "done"]
        problems: list[str] = []
        if len(records) != self.cfg.jobs:
            problems.append(f"{len(records)} jobs enqueued, not {self.cfg.jobs}")
        problems += self.job_problems(records, stats["files"])
        problems += self.leftover_problems(done, stats)
        redis_problems, leftovers = self.redis_leftovers(done)
        problems += redis_problems
        figures = self.figures(records, stats, measured, leftovers, began)
        ok = not problems
        return Outcome(ok, problems, figures, _last_line(figures, ok))

    def records(self) -> dict[str, dict[str, str]]:
        """Every enqueued job's record ({} for one that is gone), in enqueue order."""
        ids = list(self.job_ids)
        records: dict[str, dict[str, str]] = {}
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            for job_id, rec in zip(chunk, self.up.store.get_many(chunk), strict=True):
                records[job_id] = rec or {}
        return records

    def job_problems(
        self, records: dict[str, dict[str, str]], files: list[dict[str, Any]]
    ) -> list[str]:
        """A job meant to fail failed with not-found; any other is done, with exactly one file
        in the sandbox of its name, size and MD5."""
        by_place: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for f in files:
            by_place.setdefault((f["entity_id"], f["name"]), []).append(f)
        problems: list[str] = []
        for job_id, rec in records.items():
            problem = self._job_problem(job_id, rec, by_place)
            if problem is not None:
                problems.append(problem)
        return problems

    def _job_problem(
        self, job_id: str, rec: dict[str, str],
        by_place: dict[tuple[str, str], list[dict[str, Any]]],
    ) -> str | None:
        p = self.job_ids[job_id]
        state = rec.get("state", "missing")
        if p.meant_to_fail:
            if state != "failed" or rec.get("error_code") != "not-found":
                return f"{job_id} ({p.name}) meant to fail: {state} {rec.get('error_code')}"
            return None
        if state != "done":
            return (
                f"{job_id} ({p.name} -> {p.to}): {state} {rec.get('error_step', '')} "
                f"{rec.get('error_code', '')} {rec.get('error_description', '')}"
            )
        mine = by_place.get((p.entity_id, p.name), [])
        if len(mine) != 1:
            return f"{job_id} ({p.name}): {len(mine)} files in the sandbox"
        if mine[0]["md5"] != p.md5 or mine[0]["size"] != p.size or mine[0]["id"] != rec.get("file_id"):
            return f"{job_id} ({p.name}): stored file does not match (md5/size/id)"
        return None

    def leftover_problems(self, done: list[str], stats: dict[str, Any]) -> list[str]:
        """Workers that exited by themselves, sandbox files or links beyond one per done job,
        staged bytes of done jobs."""
        problems: list[str] = []
        if self.self_exits:
            problems.append(f"worker(s) exited by themselves: {', '.join(self.self_exits)}")
        extra_files = len(stats["files"]) - len(done)
        if extra_files:
            problems.append(f"{extra_files} file(s) in the sandbox beyond one per done job")
        extra_links = _extra_links(stats["links"])
        if extra_links:
            problems.append(f"{extra_links} extra link(s) of an upload id")
        staging = Path(self.env["STAGING_DIR"])
        left = {p.name for p in staging.iterdir()} if staging.is_dir() else set()
        stale = [j for j in done if j in left]
        if stale:
            problems.append(f"{len(stale)} done job(s) still have staged bytes")
        return problems

    def redis_leftovers(self, done: list[str]) -> tuple[list[str], dict[str, int]]:
        """Done records without an expiry or with a block journal (problems), and what is left
        in Redis: unacked messages, step locks, keys and used memory (figures)."""
        assert self.redis is not None
        problems: list[str] = []
        client = redis.Redis.from_url(self.redis.url, decode_responses=True)
        try:
            no_ttl = sum(1 for j in done if client.ttl(key_names.job_key(j)) < 0)
            if no_ttl:
                problems.append(f"{no_ttl} done record(s) without an expiry")
            journals = sum(1 for j in done if client.exists(key_names.block_journal_key(j)))
            if journals:
                problems.append(f"{journals} done job(s) kept their block journal")
            leftovers = {
                "unacked_left": client.hlen(key_names.KOMBU_UNACKED_KEY),
                "locks_left": len(list(client.scan_iter(key_names.STEP_LOCK_PATTERN, count=1000))),
                "mem_end": int(client.info("memory")["used_memory"]),
                "redis_keys": client.dbsize(),
            }
        finally:
            client.close()
        return problems, leftovers

    def figures(
        self, records: dict[str, dict[str, str]], stats: dict[str, Any],
        measured: dict[str, int], leftovers: dict[str, int], began: float,
    ) -> dict[str, Any]:
        """The run's figures, in the order they are printed."""
        rss_end = self.rss_kib(self.workers[0])
        seconds = time.monotonic() - began
        states = Counter(r.get("state", "missing") for r in records.values())
        sums: Counter[str] = Counter()
        for rec in records.values():
            for name in ("redrives", "reconciled", "url_renewals", "crashes_put", "crashes_link",
                         "crashes_generate", "crashes_multipart", "rate_limited", "rate_waits"):  # fmt: skip
                sums[name] += int(rec.get(name) or 0)
        done = [j for j, r in records.items() if r.get("state") == "done"]
        return {
            "jobs": len(records),
            "done": len(done),
            "failed": states.get("failed", 0),
            "expected_failed": sum(1 for p in self.job_ids.values() if p.meant_to_fail),
            "dead": states.get("dead", 0),
            "files": len(stats["files"]),
            "extra_links": _extra_links(stats["links"]),
            "kills": self.kills,
            "self_exits": len(self.self_exits),
            "redis_restarts": self.redis_restarts,
            "seconds": round(seconds),
            "multi_block_jobs": sum(1 for j in done if records[j].get("put_mode") == "blocks"),
            "faults_injected": {k: v for k, v in stats["faults_injected"].items() if v},
            "link_attempts": sum(stats["link_attempts"].values()),
            "links": sum(stats["links"].values()),
            "publish_errors": self.publish_errors,
            "unacked_left": leftovers["unacked_left"],
            "locks_left": leftovers["locks_left"],
            "redis_keys": leftovers["redis_keys"],
            "redis_used_memory_mb": [
                round(measured["mem_start"] / 1e6, 1),
                round(measured["mem_peak"] / 1e6, 1),
                round(leftovers["mem_end"] / 1e6, 1),
            ],
            "worker1_rss_mib": [round(measured["rss_start"] / 1024), round(rss_end / 1024)],
            **dict(sums),
        }


def _extra_links(links: dict[str, int]) -> int:
    """Links of an upload id beyond its first."""
    return sum(n - 1 for n in links.values() if n > 1)


# The run's last line, as _last_line writes it (the tests and scripts that run the soak parse it).
LAST_LINE = re.compile(
    r"^soak: jobs=(?P<jobs>\d+) done=(?P<done>\d+) failed=(?P<failed>\d+) \(expected (?P<expected>\d+)\) "
    r"dead=(?P<dead>\d+) files=(?P<files>\d+) extra_links=(?P<extra_links>\d+) kills=(?P<kills>\d+) "
    r"redis_restarts=(?P<redis_restarts>\d+) seconds=(?P<seconds>\d+) result=(?P<result>PASS|FAIL)$"
)


def _last_line(figures: dict[str, Any], ok: bool) -> str:
    f = figures
    return (
        f"soak: jobs={f['jobs']} done={f['done']} failed={f['failed']} (expected {f['expected_failed']}) "
        f"dead={f['dead']} files={f['files']} extra_links={f['extra_links']} kills={f['kills']} "
        f"redis_restarts={f['redis_restarts']} seconds={f['seconds']} result={'PASS' if ok else 'FAIL'}"
    )


def parse_args(argv: Sequence[str]) -> tuple[Config, bool]:
    p = argparse.ArgumentParser(prog="python -m ops.soak", description=__doc__.split("\n")[0])
    p.add_argument("--jobs", type=int, default=500, help="jobs to enqueue (500 short, 2000 long)")
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=4, help="threads per worker")
    p.add_argument("--seed", type=int, default=1234, help="plan, sandbox faults and killer")
    p.add_argument("--rate", type=float, default=6.0, help="jobs enqueued per second")
    p.add_argument("--kill-every", type=float, default=15.0, help="seconds between worker kills (±20%%)")
    p.add_argument("--fault-rate", type=float, default=0.03, help="probability of each fault kind")
    p.add_argument("--url-lifetime", type=float, default=6.0, help="upload URL lifetime (s)")
    p.add_argument("--fail-jobs", type=int, default=0, help="jobs meant to fail (default 1%%, >= 3)")
    p.add_argument("--timeout", type=float, default=0.0, help="give up after (s); default 300 + 0.5/job")
    p.add_argument(
        "--appendfsync",
        choices=["always", "everysec"],
        default="always",
        help="Redis AOF fsync policy (everysec may lose the last ~2 s of writes to a SIGKILL)",
    )
    p.add_argument("--data-dir", type=Path, help="keep everything here (default: a temp dir, removed)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs) after the run")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON line before the last")
    a = p.parse_args(list(argv))
    return Config(
        jobs=a.jobs,
        workers=a.workers,
        concurrency=a.concurrency,
        seed=a.seed,
        rate=a.rate,
        kill_every=a.kill_every,
        fault_rate=a.fault_rate,
        url_lifetime=a.url_lifetime,
        fail_jobs=a.fail_jobs,
        timeout=a.timeout,
        appendfsync=a.appendfsync,
        data_dir=a.data_dir,
        keep=a.keep or a.data_dir is not None,
    ), bool(a.json)


def main(argv: Sequence[str] | None = None) -> int:
    cfg, as_json = parse_args(sys.argv[1:] if argv is None else argv)
    soak = Soak(cfg)
    interrupted = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal interrupted
        interrupted = True
        soak._stop.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        outcome = soak.run()
    except KeyboardInterrupt:
        print("soak: interrupted", flush=True)
        soak.cfg.keep = True
        soak.stop()
        return 130
    except BaseException:
        soak.cfg.keep = True
        soak.stop()
        print(f"soak: error; logs kept in {soak.root / 'logs'}", flush=True)
        raise
    if not outcome.ok:
        soak.cfg.keep = True
    soak.stop()
    for key in ("faults_injected", "redis_used_memory_mb", "worker1_rss_mib"):
        print(f"soak: {key}={outcome.figures[key]}")
    print(
        "soak: "
        + " ".join(
            f"{k}={v}"
            for k, v in outcome.figures.items()
            if k not in ("faults_injected", "redis_used_memory_mb", "worker1_rss_mib")
        )
    )
    for problem in outcome.problems[:30]:
        print(f"soak: problem: {problem}")
    if len(outcome.problems) > 30:
        print(f"soak: ... and {len(outcome.problems) - 30} more problems")
    if not outcome.ok:
        print(f"soak: logs kept in {soak.root}")
    if as_json:
        print(json.dumps(outcome.figures))
    print(outcome.last_line, flush=True)
    return 0 if outcome.ok else 1
