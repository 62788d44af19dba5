"""Bounded retries of a Redis call: a producer rides out a Redis restart or failover of a few
seconds, then says which Redis it could not reach (`RedisUnavailable`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import redis

from producers.config import redact_url

T = TypeVar("T")


class RedisUnavailable(ConnectionError):
    """Redis could not be reached within the retry window; the message names the URL."""


def retry_redis(fn: Callable[[], T], seconds: float, redis_url: str) -> T:
    """Retry `fn` on connection errors for `seconds`, backing off, then raise RedisUnavailable
    (naming `redis_url` without its password)."""
    deadline = time.monotonic() + seconds
    delay = 0.1
    while True:
        try:
            return fn()
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            if time.monotonic() + delay > deadline:
                raise RedisUnavailable(
                    f"REDIS_URL: Redis at {redact_url(redis_url)} is unreachable ({exc})"
                ) from None
            time.sleep(delay)
            delay = min(delay * 2, 1.0)
