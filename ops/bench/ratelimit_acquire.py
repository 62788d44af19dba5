"""How fast is RateLimiter.acquire()? Run by hand, not in the tests:

    .venv/bin/python -m ops.bench.ratelimit_acquire [--seconds 3] [--procs 4]

Starts a private redis-server (free loopback port, AOF on as in production, temp data dir) and
measures, in one process: a bare PING round trip (the floor), acquire() when tokens are granted,
acquire() when refused with a full standard-plan minute log (970 entries), and the script's
server-side cost from INFO commandstats. With --procs N > 1 it also measures N processes
calling acquire() on one workspace at once. Prints calls/s and microseconds per call.
"""

from __future__ import annotations

import argparse
import multiprocessing
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import redis

from ops.redis_server import RedisServer
from workers.limits_config import WorkspaceLimits
from workers.ratelimit import RateLimiter


def _rate(fn: Callable[[], object], seconds: float) -> tuple[int, float]:
    n = 0
    start = time.perf_counter()
    end = start + seconds
    while True:
        for _ in range(100):
            fn()
        n += 100
        now = time.perf_counter()
        if now >= end:
            return n, now - start


def _evalsha_usec(client: redis.Redis) -> float:
    stats = client.info("commandstats")
    return float(stats.get("cmdstat_evalsha", {}).get("usec_per_call", 0.0))


def _unreachable_limits() -> WorkspaceLimits:
    """Limits nobody reaches: every call takes a token."""
    return WorkspaceLimits(per_minute=10**9, per_second=10**9, margin=1.0)


def _proc(url: str, seconds: float, start_at: float, out: multiprocessing.Queue) -> None:
    client = redis.Redis.from_url(url)
    rl = RateLimiter(client, pace_tolerance=0.0)
    lim = _unreachable_limits()
    time.sleep(max(0.0, start_at - time.time()))
    n, took = _rate(lambda: rl.acquire("bench-multi", lim), seconds)
    out.put((n, took))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0, help="per measurement (default 3)")
    ap.add_argument("--procs", type=int, default=4, help="processes for the parallel run (default 4)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp) / "redis") as srv:
        client = redis.Redis.from_url(srv.url)
        print(f"redis-server {client.info('server')['redis_version']} on {srv.url}, "
              f"{args.seconds:g} s per measurement")

        n, took = _rate(client.ping, args.seconds)
        ping_us = took / n * 1e6
        print(f"PING round trip            {n / took:9.0f} calls/s  {ping_us:7.1f} us/call")

        rl = RateLimiter(client, pace_tolerance=0.0)
        granted = _unreachable_limits()
        client.config_resetstat()
        n, took = _rate(lambda: rl.acquire("bench-granted", granted), args.seconds)
        us = took / n * 1e6
        print(f"acquire, granted           {n / took:9.0f} calls/s  {us:7.1f} us/call  "
              f"(+{us - ping_us:.1f} us over PING; server side {_evalsha_usec(client):.1f} us; "
              f"log grew to {n} entries)")

        # A full standard-plan minute: 970 entries, every call refused with a computed wait.
        std = WorkspaceLimits.standard()
        fill = WorkspaceLimits(per_minute=1000, per_second=1000, margin=0.97)
        while rl.acquire("bench-refused", fill) == 0.0:
            pass
        client.config_resetstat()
        n, took = _rate(lambda: rl.acquire("bench-refused", std), args.seconds)
        us = took / n * 1e6
        print(f"acquire, refused (970 log) {n / took:9.0f} calls/s  {us:7.1f} us/call  "
              f"(+{us - ping_us:.1f} us over PING; server side {_evalsha_usec(client):.1f} us)")

        paced = RateLimiter(client)
        client.config_resetstat()
        n, took = _rate(lambda: paced.acquire("bench-paced", std), args.seconds)
        us = took / n * 1e6
        print(f"acquire, standard plan     {n / took:9.0f} calls/s  {us:7.1f} us/call  "
              f"(mostly refused by pacing; server side {_evalsha_usec(client):.1f} us)")

        if args.procs > 1:
            ctx = multiprocessing.get_context("spawn")
            q: multiprocessing.Queue = ctx.Queue()
            start_at = time.time() + 1.5
            procs = [
                ctx.Process(target=_proc, args=(srv.url, args.seconds, start_at, q))
                for _ in range(args.procs)
            ]
            for p in procs:
                p.start()
            results = [q.get(timeout=args.seconds + 60) for _ in procs]
            for p in procs:
                p.join()
            total = sum(n / took for n, took in results)
            print(f"acquire, granted, {args.procs} procs {total:9.0f} calls/s in total "
                  f"({total / args.procs:.0f} per process), one workspace")
        client.close()


if __name__ == "__main__":
    main()
