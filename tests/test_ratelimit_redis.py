"""The rate limiter against a real redis-server, with several OS processes sharing it.

Each process hammers acquire() and records the Redis time of every token it was granted; the
merged record must never hold more than the limit in any 1 s or 60 s interval, and must reach
~90% of what the binding limit allows.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
import redis

from ops.redis_server import RedisServer
from workers.limits_config import WorkspaceLimits
from workers.ratelimit import RateLimiter

PROCESSES = 4
# Fleets of limiter processes and a Redis restart: `make test` runs them, `make test-fast` does not.
pytestmark = [pytest.mark.slow, pytest.mark.timing]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    srv = RedisServer(tmp_path_factory.mktemp("redis-rl")).start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def pool() -> Iterator[ProcessPoolExecutor]:
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(PROCESSES * 2, mp_context=ctx) as ex:
        # Warm the workers up (spawn + imports) before anything is timed.
        list(ex.map(_noop, range(PROCESSES * 2)))
        yield ex


def _noop(_: int) -> None:
    import workers.ratelimit  # noqa: F401


def hammer(
    url: str, workspace: str, limits: WorkspaceLimits, start_at: float, duration: float
) -> list[int]:
    """Ask for tokens until `duration` has passed; the Redis times (us) of the granted ones."""
    client = redis.Redis.from_url(url)
    rl = RateLimiter(client)
    granted: list[int] = []
    time.sleep(max(0.0, start_at - time.time()))
    end = start_at + duration
    while time.time() < end:
        d = rl.try_acquire(workspace, limits)
        if d.granted:
            granted.append(round(d.server_time * 1_000_000))
        else:
            time.sleep(min(d.wait, max(0.0, end - time.time())))
    client.close()
    return granted


def run_fleet(
    pool: ProcessPoolExecutor,
    url: str,
    jobs: list[tuple[str, WorkspaceLimits]],
    duration: float,
) -> dict[str, list[int]]:
    start_at = time.time() + 0.3
    futures = [
        (ws, pool.submit(hammer, url, ws, lim, start_at, duration))
        for ws, lim in jobs
        for _ in range(PROCESSES)
    ]
    out: dict[str, list[int]] = {}
    for ws, fut in futures:
        out.setdefault(ws, []).extend(fut.result(timeout=duration + 30))
    return {ws: sorted(ts) for ws, ts in out.items()}


def max_in_any_interval(times_us: list[int], length_us: int) -> int:
    """The most grants in any closed interval [t, t + length]."""
    best, j = 0, 0
    for i, t in enumerate(times_us):
        while times_us[j] < t - length_us:
            j += 1
        best = max(best, i - j + 1)
    return best


def test_fleet_never_exceeds_either_window(server: RedisServer, pool: ProcessPoolExecutor) -> None:
    # 20/s and 60/min: the second window binds for the first ~3 s, then the minute window.
    lim = WorkspaceLimits(per_minute=60, per_second=20, margin=1.0)
    times = run_fleet(pool, server.url, [("fleet", lim)], duration=4.5)["fleet"]
    assert max_in_any_interval(times, 1_000_000) <= 20
    assert max_in_any_interval(times, 60_000_000) <= 60
    # The minute's whole budget is used, at ~the per-second rate.
    assert len(times) == 60
    span = (times[-1] - times[0]) / 1e6
    rate = (len(times) - 1) / span
    assert rate >= 0.9 * 20, f"{len(times)} grants in {span:.2f} s"


def test_fleet_reaches_the_second_limit(server: RedisServer, pool: ProcessPoolExecutor) -> None:
    lim = WorkspaceLimits(per_minute=100_000, per_second=20, margin=1.0)
    duration = 3.0
    times = run_fleet(pool, server.url, [("persec", lim)], duration)["persec"]
    assert max_in_any_interval(times, 1_000_000) <= 20
    # The limit allows 20 per second over the run.
    assert len(times) >= 0.9 * 20 * duration, len(times)


def test_paused_workspace_does_not_slow_another(
    server: RedisServer, pool: ProcessPoolExecutor
) -> None:
    lim = WorkspaceLimits(per_minute=100_000, per_second=20, margin=1.0)
    client = redis.Redis.from_url(server.url)
    RateLimiter(client).pause("paused", 30, "test")
    duration = 3.0
    times = run_fleet(pool, server.url, [("paused", lim), ("flowing", lim)], duration)
    assert times["paused"] == []
    assert len(times["flowing"]) >= 0.9 * 20 * duration
    assert max_in_any_interval(times["flowing"], 1_000_000) <= 20
    client.close()


def test_survives_a_redis_restart(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis") as srv:
        client = redis.Redis.from_url(srv.url)
        rl = RateLimiter(client)
        lim = WorkspaceLimits(per_minute=100, per_second=10, margin=1.0)
        assert rl.acquire("w", lim) == 0.0
        srv.restart()  # SIGKILL: the script cache is gone, the connection too
        deadline = time.monotonic() + 5
        while True:
            try:
                rl.pause("w", 1.0)
                break
            except redis.exceptions.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        assert rl.try_acquire("w", lim).blocked_by == "pause"
        client.close()
