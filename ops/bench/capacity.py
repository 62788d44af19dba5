"""Benchmark: the per-job inputs of the capacity model (ops/CAPACITY.md), measured on one fleet.

One private redis-server, the sandbox (no added latency, rate limits far above the load) and
--workers worker processes. After a warm-up batch the workers stop consuming (Celery's
cancel_consumer), --jobs small-file jobs are enqueued, and then the workers consume again:

- Redis memory per queued job: INFO used_memory after the enqueue minus before, over the jobs
  (record, indexes and, on the Redis transport, the message);
- Redis commands per job: the delta of INFO commandstats from before the enqueue to the last job
  done, enqueue included (this script's own INFO/CONFIG/MEMORY calls and its polls left out);
- broker messages per job: on the Redis transport the LPUSH calls (every published step message
  is one) and PUBLISH calls (events, broadcasts); the same tasks publish the same step messages
  on RabbitMQ (a countdown adds its hops through the delayed-delivery queues there);
- bytes per job: Redis network bytes in and out (INFO stats) over the same interval;
- CPU per job: the worker processes (utime + stime from /proc, threads included) and
  redis-server (INFO cpu), so load elsewhere on the machine does not count;
- Redis memory per finished record: used_memory once every job is done (staged bytes and
  messages gone, records kept until their TTL) minus before the enqueue, over the jobs, and
  MEMORY USAGE of a sample of finished job hashes.

    .venv/bin/python -m ops.bench.capacity --jobs 500              # Redis transport
    .venv/bin/python -m ops.bench.capacity --jobs 500 --amqp       # RabbitMQ quorum queues
    .venv/bin/python -m ops.bench.capacity --quorum-rate 20000      # one quorum queue's rate
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from celery import Celery

from ops.demo_files import random_file
from ops.processes import Child, stop_all
from ops.rabbitmq import Vhost
from ops.redis_server import RedisServer, command_calls
from ops.sandbox.launcher import SandboxProcess
from ops.stack import ping_workers, worker_argv
from producers.broker import celery_config
from producers.client import Uploads
from producers.config import SharedSettings
from producers.contract import QUEUE_API, QUEUE_TRANSFER
from producers.keys import ACTIVE_KEY, job_key
from producers.spec import JobSpec

API_KEY = "bench-key"
HIGH_PER_MINUTE, HIGH_PER_SECOND = 1_000_000, 100_000
OWN_COMMANDS = {"info", "config", "memory", "client", "zcard"}  # this script's, not the fleet's
STEP_QUEUES = (QUEUE_API, QUEUE_TRANSFER)
ID = re.compile(r"[0-9a-f]{32}|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@dataclass
class Fleet:
    root: Path
    server: RedisServer
    sandbox: SandboxProcess
    env: dict[str, str]
    vhost: Vhost | None = None
    workers: list[Child] = field(default_factory=list)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.server.url, decode_responses=True)

    def app(self) -> Celery:
        app = Celery("capacity-control", set_as_current=False)
        app.conf.update(celery_config(self.env["REDIS_URL"]))
        return app

    def stop(self) -> None:
        stop_all(self.workers, grace=15)
        self.sandbox.stop()
        self.server.stop()
        if self.vhost is not None:
            self.vhost.delete()


def start_fleet(args: argparse.Namespace) -> Fleet:
    root = Path(tempfile.mkdtemp(prefix="bench-capacity-"))
    vhost = Vhost().create() if args.amqp else None
    server = RedisServer(root / "redis").start()
    sandbox = SandboxProcess(
        api_keys={API_KEY: "default"},
        data_dir=root / "sandbox",
        extra_args=[
            f"--rate-limit-per-minute={HIGH_PER_MINUTE}",
            f"--rate-limit-per-second={HIGH_PER_SECOND}",
        ],
    )
    sandbox.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWORK_", "BROKER_URL"))}
    env.update(
        REDIS_URL=server.url,
        STAGING_DIR=str(root / "staging"),
        AWORK_API_URL=sandbox.api_url,
        AWORK_API_KEY=API_KEY,
        AWORK_UPLOAD_HOSTS=sandbox.upload_host,
        AWORK_RATE_LIMIT_PER_MINUTE=str(HIGH_PER_MINUTE),
        AWORK_RATE_LIMIT_PER_SECOND=str(HIGH_PER_SECOND),
    )
    if vhost is not None:
        # the workers, and this process's producer and control apps, publish there
        env["BROKER_URL"] = os.environ["BROKER_URL"] = vhost.url
    fleet = Fleet(root, server, sandbox, env, vhost)
    try:
        for n in range(args.workers):
            argv = worker_argv(args.concurrency, f"cap{n}-{uuid.uuid4().hex[:4]}@%h", "WARNING")
            fleet.workers.append(Child(f"w{n}", argv, env, root / "logs" / f"w{n}.log").start())
        deadline = time.monotonic() + 90
        while ping_workers(env) < args.workers:
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers did not start; logs in {root / 'logs'}")
            time.sleep(0.5)
    except BaseException:
        fleet.stop()
        raise
    return fleet


def uploads(env: dict[str, str]) -> Uploads:
    saved = dict(os.environ)
    os.environ.update({k: env[k] for k in ("REDIS_URL", "STAGING_DIR")})
    if "BROKER_URL" in env:
        os.environ["BROKER_URL"] = env["BROKER_URL"]
    os.environ.pop("AWORK_WORKSPACES_FILE", None)
    try:
        return Uploads(SharedSettings.from_env())
    finally:
        os.environ.clear()
        os.environ.update(saved)


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a process and its descendants, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            for task in Path(f"/proc/{p}/task").iterdir():
                todo.extend(int(c) for c in (task / "children").read_text().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


@dataclass
class Snapshot:
    calls: Counter[str]
    net_in: int
    net_out: int
    memory: int
    redis_cpu: float
    worker_cpu: float

    @classmethod
    def take(cls, client: redis.Redis, workers: list[Child]) -> Snapshot:
        calls = command_calls(client)
        net = client.info("stats")
        cpu = client.info("cpu")
        return cls(
            calls=calls,
            net_in=int(net["total_net_input_bytes"]),
            net_out=int(net["total_net_output_bytes"]),
            memory=int(client.info("memory")["used_memory"]),
            redis_cpu=float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
            worker_cpu=sum(tree_cpu(w.proc.pid) for w in workers if w.proc is not None),
        )


def key_families(client: redis.Redis) -> Counter[str]:
    """Keys by shape, ids replaced by {id}: what each job leaves in Redis."""
    out: Counter[str] = Counter()
    for key in client.scan_iter(count=1000):
        out[ID.sub("{id}", str(key))] += 1
    return out


def wait_done(client: redis.Redis, timeout: float) -> int:
    """Poll the active set until it is empty; returns the polls made (ZCARD calls to subtract)."""
    deadline, polls = time.monotonic() + timeout, 0
    while time.monotonic() < deadline:
        polls += 1
        if int(client.zcard(ACTIVE_KEY)) == 0:
            return polls
        time.sleep(0.5)
    raise TimeoutError("jobs still active")


def set_consuming(fleet: Fleet, on: bool) -> None:
    app = fleet.app()
    try:
        for queue in STEP_QUEUES:
            if on:
                app.control.add_consumer(queue, reply=True, timeout=5)
            else:
                app.control.cancel_consumer(queue, reply=True, timeout=5)
    finally:
        app.close()


def run_batch(fleet: Fleet, up: Uploads, files: list[Path], task_id: str) -> None:
    jobs = up.enqueue_many([JobSpec(f, f"task:{task_id}") for f in files])
    final = up.wait_many([j.id for j in jobs], timeout=600, poll=0.5)
    bad = [j.state.value for j in final if j.state.value != "done"]
    if bad:
        raise RuntimeError(f"{len(bad)} jobs did not end done: {Counter(bad)}")


def per_job(a: Snapshot, b: Snapshot, jobs: int, polls: int = 0) -> dict[str, Any]:
    calls = b.calls - a.calls
    calls["zcard"] = max(0, calls["zcard"] - polls)
    fleet_calls = Counter({k: v for k, v in calls.items() if k not in OWN_COMMANDS})
    return {
        "redis_commands": round(sum(fleet_calls.values()) / jobs, 1),
        "top_commands": {k: round(v / jobs, 2) for k, v in fleet_calls.most_common(12)},
        "lpush": round(calls["lpush"] / jobs, 2),
        "publish": round(calls["publish"] / jobs, 2),
        "redis_net_in_bytes": round((b.net_in - a.net_in) / jobs),
        "redis_net_out_bytes": round((b.net_out - a.net_out) / jobs),
        "redis_cpu_ms": round((b.redis_cpu - a.redis_cpu) * 1000 / jobs, 2),
        "worker_cpu_ms": round((b.worker_cpu - a.worker_cpu) * 1000 / jobs, 1),
    }


def measure(fleet: Fleet, args: argparse.Namespace) -> dict[str, Any]:
    client = fleet.client()
    up = uploads(fleet.env)
    task_id = fleet.sandbox.seed("tasks", str(uuid.uuid4()))
    files = [random_file(fleet.root / "files" / f"f{i:05d}.bin", args.size) for i in range(args.jobs + 20)]
    try:
        run_batch(fleet, up, files[:20], task_id)  # warm-up: imports, connections, caches
        set_consuming(fleet, False)
        time.sleep(1.0)
        before = Snapshot.take(client, fleet.workers)
        keys_before = key_families(client)
        jobs = up.enqueue_many([JobSpec(f, f"task:{task_id}") for f in files[20:]])
        queued = Snapshot.take(client, fleet.workers)
        keys_queued = key_families(client) - keys_before
        began = time.monotonic()
        set_consuming(fleet, True)
        polls = wait_done(client, 900)
        seconds = time.monotonic() - began
        done = Snapshot.take(client, fleet.workers)
        time.sleep(2.0)
        settled = int(client.info("memory")["used_memory"])
        keys_done = key_families(client) - keys_before
        sample = [j.id for j in jobs[:: max(1, len(jobs) // 50)]]
        record_bytes = [int(client.memory_usage(job_key(i)) or 0) for i in sample]
        states = Counter(str(client.hget(job_key(j.id), "state")) for j in jobs)
    finally:
        up.close()
        client.close()
    n = args.jobs
    return {
        "broker": "rabbitmq-quorum" if args.amqp else "redis",
        "jobs": n,
        "size": args.size,
        "workers": args.workers,
        "concurrency": args.concurrency,
        "states": dict(states),
        "seconds": round(seconds, 1),
        "memory_per_queued_job_bytes": round((queued.memory - before.memory) / n),
        "memory_per_finished_record_bytes": round((settled - before.memory) / n),
        "memory_usage_of_a_finished_record_bytes": round(sum(record_bytes) / max(1, len(record_bytes))),
        "keys_added_queued": dict(keys_queued),
        "keys_added_finished": dict(keys_done),
        "enqueue_redis_commands": round(sum((queued.calls - before.calls).values()) / n, 1),
        "per_job": per_job(before, done, n, polls),
    }


def quorum_rate(messages: int, size: int, publishers: int = 8) -> dict[str, Any]:
    """Publish `messages` persistent messages of `size` bytes with publisher confirms into one
    quorum queue from `publishers` connections at once, then consume and ack them all: the rate
    of one queue (one Raft group) on this node, a single-node floor for the model's broker column.
    Each publish waits for its confirm, as a worker's does."""
    from concurrent.futures import ThreadPoolExecutor

    from kombu import Connection, Exchange, Queue

    from producers.transport import QUORUM

    body = "x" * size
    queue = Queue("rate", Exchange("rate", type="topic"), routing_key="rate", queue_arguments=dict(QUORUM))
    with Vhost() as vhost:

        def publish(n: int) -> None:
            with Connection(vhost.url, transport_options={"confirm_publish": True}) as conn:
                producer = conn.Producer()
                for _ in range(n):
                    producer.publish(body, exchange=queue.exchange, routing_key="rate", declare=[queue])

        started = time.monotonic()
        with ThreadPoolExecutor(publishers) as pool:
            list(pool.map(publish, [messages // publishers] * publishers))
        published = time.monotonic() - started
        total, got = messages // publishers * publishers, 0

        def on_message(_body: Any, message: Any) -> None:
            nonlocal got
            got += 1
            message.ack()

        started = time.monotonic()
        with Connection(vhost.url) as conn, conn.Consumer(queue, callbacks=[on_message], prefetch_count=100):
            while got < total:
                conn.drain_events(timeout=10)
        consumed = time.monotonic() - started
    return {
        "messages": total,
        "size": size,
        "publishers": publishers,
        "publish_confirmed_per_s": round(total / published),
        "consume_acked_per_s": round(total / consumed),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--jobs", type=int, default=500)
    p.add_argument("--size", type=int, default=20_000, help="bytes per file")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=8, help="threads per worker")
    p.add_argument("--amqp", action="store_true", help="RabbitMQ (quorum queues) as the broker")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    p.add_argument("--quorum-rate", type=int, default=0, help="only: N messages through one quorum queue")
    args = p.parse_args()
    if args.quorum_rate:
        print(json.dumps(quorum_rate(args.quorum_rate, 1500), indent=1))
        return 0
    fleet = start_fleet(args)
    try:
        result = measure(fleet, args)
    finally:
        fleet.stop()
        if not args.keep:
            shutil.rmtree(fleet.root, ignore_errors=True)
    print(json.dumps(result, indent=1))
    return 0 if set(result["states"]) == {"done"} else 1


if __name__ == "__main__":
    raise SystemExit(main())
