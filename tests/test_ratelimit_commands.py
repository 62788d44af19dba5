"""How many Redis commands the rate limiter's script runs, against a real redis-server.

INFO commandstats counts the commands a script runs inside Redis as well as those clients send,
and the limiter is called four times per job (acquire and observe for two awork requests), so
its command count is part of every job's cost. Bounds (see the head of workers/ratelimit.lua):
a granted acquire 7 commands (TIME, HMGET, ZCOUNT x2, ZADD x2, HSET) plus, at most once a second,
a trim (2) and, about every 5 s, expiries pushed out (3); an observe of a 2xx that carries the
x-ratelimit-* headers and finds no outside usage 4 (TIME, HMGET, ZCOUNT x2); a refused acquire
at most 6. The layout of separate pause/learned/seq/pace keys ran ~19 and ~9.
"""

from __future__ import annotations

import time

import redis

from ops.redis_server import command_calls
from workers.limits_config import WorkspaceLimits
from workers.ratelimit import RateLimiter

N = 200
LIMITS = WorkspaceLimits(per_minute=1_000_000, per_second=100_000, margin=1.0)
HEADERS = {
    "x-ratelimit-limit-minute": str(LIMITS.per_minute),
    "x-ratelimit-remaining-minute": str(LIMITS.per_minute - 1),  # awork counted one: ours
    "x-ratelimit-limit-second": str(LIMITS.per_second),
    "x-ratelimit-remaining-second": str(LIMITS.per_second - 1),
}


def _inside_per_call(client: redis.Redis, call: object, n: int = N) -> tuple[float, dict[str, int]]:
    """Commands the script ran per call (all commands but EVALSHA and INFO), and by name."""
    assert callable(call)
    before = command_calls(client)
    for _ in range(n):
        call()
    after = command_calls(client)
    delta = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
    assert delta.pop("evalsha") == n
    delta.pop("info", None)
    return sum(delta.values()) / n, delta


def test_commands_per_acquire_and_observe(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    rl = RateLimiter(client)  # Redis TIME and pacing, as in production
    rl.acquire("w", LIMITS)  # loads the script; the first call also trims and sets expiries
    rl.observe("w", LIMITS, 200, HEADERS)

    def grant() -> None:
        assert rl.try_acquire("w", LIMITS).granted

    per_grant, by_name = _inside_per_call(client, grant)
    assert per_grant <= 7.5, by_name
    assert by_name["hset"] == N and by_name["zadd"] == 2 * N and by_name["hmget"] == N

    per_observe, by_name = _inside_per_call(client, lambda: rl.observe("w", LIMITS, 200, HEADERS))
    assert per_observe <= 4.5, by_name
    assert "hset" not in by_name and "zadd" not in by_name  # nothing changed, nothing written

    rl.pause("w", 30)  # longer than any wait of the second window: only the minute log is read
    per_refused, by_name = _inside_per_call(client, lambda: rl.acquire("w", LIMITS), 20)
    assert per_refused <= 3, by_name
    rl.pause("w", 90)  # longer than any wait of either window: no log is read
    per_refused, by_name = _inside_per_call(client, lambda: rl.acquire("w", LIMITS), 20)
    assert per_refused <= 2, by_name
    client.close()


def test_a_refused_acquire_writes_nothing(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    rl = RateLimiter(client, pace_tolerance=0.0)
    small = WorkspaceLimits(per_minute=1000, per_second=2, margin=1.0)
    assert rl.acquire("w", small) == 0.0
    assert rl.acquire("w", small) == 0.0
    time.sleep(0.01)
    per_refused, by_name = _inside_per_call(client, lambda: rl.acquire("w", small), 20)
    assert set(by_name) <= {"time", "hmget", "zcount", "zrangebyscore"}, by_name
    assert per_refused <= 6, by_name
    client.close()
