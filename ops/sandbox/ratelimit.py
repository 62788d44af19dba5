"""awork's server-side rate limiter, in memory: Kong's rate-limiting plugin, per workspace.

awork sends Kong's headers, so the sandbox copies Kong's algorithm: fixed windows aligned to
the wall-clock second and minute, a request is refused when any window has nothing left, a
refused request does not count, and the `RateLimit-*` headers describe the window with the
fewest requests left (the longer window on a tie). Clients that survive this survive awork.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    per_minute: int = 1000
    per_second: int = 50


@dataclass
class _Usage:
    second: int = -1
    second_count: int = 0
    minute: int = -1
    minute_count: int = 0


@dataclass(frozen=True)
class Decision:
    allowed: bool
    headers: dict[str, str]
    reset: int  # seconds until the limiting window ends (Kong's RateLimit-Reset)


class RateLimiter:
    """Fixed-window counters per workspace; `limits_for` picks a workspace's plan."""

    def __init__(self, default: Limits, overrides: dict[str, Limits] | None = None) -> None:
        self.default = default
        self.overrides: dict[str, Limits] = dict(overrides or {})
        self._usage: dict[str, _Usage] = {}

    def limits_for(self, workspace: str) -> Limits:
        return self.overrides.get(workspace, self.default)

    def reset(self) -> None:
        self._usage.clear()

    def hit(self, workspace: str, now: float) -> Decision:
        """Count one request at `now` (unix seconds) unless a window is exhausted."""
        limits = self.limits_for(workspace)
        usage = self._usage.get(workspace)
        if usage is None:
            usage = self._usage[workspace] = _Usage()
        sec = int(now)
        minute = sec // 60
        if usage.second != sec:
            usage.second, usage.second_count = sec, 0
        if usage.minute != minute:
            usage.minute, usage.minute_count = minute, 0
        rem_s = limits.per_second - usage.second_count
        rem_m = limits.per_minute - usage.minute_count
        stop_s = rem_s <= 0
        stop_m = rem_m <= 0
        allowed = not (stop_s or stop_m)
        if allowed:
            usage.second_count += 1
            usage.minute_count += 1
        # Kong: remaining after this request (an allowed one uses one up; a refused one
        # shows 0 for the window that refused it).
        if allowed or stop_s:
            rem_s -= 1
        if allowed or stop_m:
            rem_m -= 1
        rem_s = max(0, rem_s)
        rem_m = max(0, rem_m)
        reset_s = 1
        reset_m = max(1, 60 - math.floor(now - minute * 60))
        if rem_s < rem_m:
            limit, remaining, reset = limits.per_second, rem_s, reset_s
        else:  # a tie goes to the longer window, as in Kong
            limit, remaining, reset = limits.per_minute, rem_m, reset_m
        headers = {
            "X-RateLimit-Limit-Second": str(limits.per_second),
            "X-RateLimit-Remaining-Second": str(rem_s),
            "X-RateLimit-Limit-Minute": str(limits.per_minute),
            "X-RateLimit-Remaining-Minute": str(rem_m),
            "RateLimit-Limit": str(limit),
            "RateLimit-Remaining": str(remaining),
            "RateLimit-Reset": str(reset),
        }
        return Decision(allowed, headers, reset)

    def exhausted_headers(self, workspace: str, now: float) -> tuple[dict[str, str], int]:
        """Headers for an injected 429 (a "429 storm"): the current windows, nothing left."""
        limits = self.limits_for(workspace)
        usage = self._usage.get(workspace)
        rem_m = limits.per_minute
        if usage is not None and usage.minute == int(now) // 60:
            rem_m = max(0, limits.per_minute - usage.minute_count)
        headers = {
            "X-RateLimit-Limit-Second": str(limits.per_second),
            "X-RateLimit-Remaining-Second": "0",
            "X-RateLimit-Limit-Minute": str(limits.per_minute),
            "X-RateLimit-Remaining-Minute": str(rem_m),
            "RateLimit-Limit": str(limits.per_second),
            "RateLimit-Remaining": "0",
            "RateLimit-Reset": "1",
        }
        return headers, 1
