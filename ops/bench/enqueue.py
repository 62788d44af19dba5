"""How fast do producers enqueue? Run by hand, not in the tests:

    .venv/bin/python -m ops.bench.enqueue [--sizes 1,100,10000] [--total 20000] [--kinds url,bytes,staged]

Starts a private redis-server (free loopback port, AOF on with everysec as in production's
default, temp data dir) and, for each source kind and batch size, calls `Uploads.enqueue_many`
with batches of that size until about `--total` jobs are enqueued (a batch of 1 is the single
`enqueue` path), then prints jobs/s and the producer's CPU per job. Source kinds: `url`
(http(s) sources on the allow-list: validation, record, message), `bytes` (2 KB of raw bytes
copied into staging) and `staged` (files already under STAGING_DIR, referenced in place).
No worker runs: the messages stay in the queues, and each run starts on an empty Redis.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import uuid
from pathlib import Path

import redis

from ops.redis_server import RedisServer
from producers.client import Uploads
from producers.config import SharedSettings
from producers.spec import JobSpec

HOST = "files.example.com"


def _specs(kind: str, n: int, staged_dir: Path, start: int) -> list[JobSpec]:
    to = f"task:{uuid.UUID(int=start)}"
    out = []
    for i in range(n):
        name = f"report-{start + i}.pdf"
        if kind == "url":
            source: str | bytes | Path = f"https://{HOST}/exports/{start + i}/{name}?sig=abc"
        elif kind == "bytes":
            source = b"x" * 2048
        else:
            path = staged_dir / name
            path.write_bytes(b"x" * 2048)
            source = path
        out.append(JobSpec(source, to, name=name))
    return out


def run(up: Uploads, kind: str, size: int, total: int, staged_dir: Path) -> tuple[int, float, float]:
    batches = max(1, total // size)
    prepared = [_specs(kind, size, staged_dir, b * size) for b in range(batches)]
    cpu0, t0 = time.process_time(), time.perf_counter()
    for specs in prepared:
        if size == 1:
            s = specs[0]
            up.enqueue(s.source, to=s.to, name=s.name)
        else:
            up.enqueue_many(specs)
    took, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    jobs = batches * size
    return jobs, took, cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="1,100,10000")
    parser.add_argument("--total", type=int, default=20000, help="jobs per run (batches of 1: a tenth)")
    parser.add_argument("--kinds", default="url,bytes,staged")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="awork-bench-enqueue-") as tmp:
        root = Path(tmp)
        server = RedisServer(root / "redis", appendonly=True).start()
        try:
            staging = root / "staging"
            staging.mkdir()
            os.environ.update(REDIS_URL=server.url, STAGING_DIR=str(staging), AWORK_SOURCE_URL_HOSTS=HOST)
            os.environ.pop("AWORK_WORKSPACES_FILE", None)
            client = redis.Redis.from_url(server.url)
            print(f"{'kind':<8}{'batch':>7}{'jobs':>8}{'seconds':>9}{'jobs/s':>9}{'CPU us/job':>12}")
            for kind in args.kinds.split(","):
                for size in (int(s) for s in args.sizes.split(",")):
                    client.flushall()
                    total = args.total // 10 if size == 1 else args.total
                    with Uploads(SharedSettings.from_env()) as up:
                        if kind != "staged":  # message templates and scripts loaded
                            up.enqueue_many(_specs(kind, 1, staging, 10**6))
                        jobs, took, cpu = run(up, kind, size, total, staging)
                    rate, per_job = jobs / took, cpu / jobs * 1e6
                    print(f"{kind:<8}{size:>7}{jobs:>8}{took:>9.2f}{rate:>9.0f}{per_job:>12.0f}")
            client.close()
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
