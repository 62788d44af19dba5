"""The fleet-wide rate limiter: one per awork workspace, in Redis, shared by every worker.

awork limits each workspace (all its integrations together) to 1000 or 3000 requests a minute
and 50 a second, counted by its gateway in fixed windows aligned to the wall-clock second and
minute. Celery's `rate_limit` is per worker, so the fleet shares state in Redis instead: one
Lua script (`ratelimit.lua`, run with EVALSHA and reloaded by redis-py after a Redis restart or
SCRIPT FLUSH) decides atomically, on the Redis server's clock, whether a request may go now.

Algorithm (per workspace; keys `awork:rl:{workspace}:m`, `:s` and `:state`, all with expiries,
named by `producers.keys.rate_limit_keys`):

* A sliding log of grant times (sorted sets, microseconds of Redis TIME). A token is granted
  only if fewer than Lm grants lie in the closed interval [now - 60 s, now] and fewer than Ls in
  [now - 1 s, now]. Hence no interval of 60 s (1 s), wherever it is placed, ever holds more
  than Lm (Ls) grants: if one held Lm + 1, the last of them would have seen the other Lm within
  60 s behind it and been refused. awork's fixed windows are such intervals whatever their
  alignment and whatever the offset between awork's clock and ours. (GCRA or a token bucket
  with a minute-sized burst is not enough: it lets ~2 L through in some 60 s interval.)
* Pacing on top: grants are spaced 1/Ls apart on average and may run at most
  `pace_tolerance` (0.1 s) ahead of that schedule. Without it a saturated fleet sends each
  second's budget as one burst that repeats every second, and a few milliseconds of network
  jitter then move a whole burst into awork's next window. Throughput is unchanged.
* A pause (`pause()`, or `observe()` of a 429) stops the whole workspace until a given Redis
  time; the longer of an existing and a new pause wins, and it ends by itself.
* Learning from awork's headers (`observe()` after every response): awork's own
  `x-ratelimit-limit-*` lower than ours replaces ours (with the margin); when
  `x-ratelimit-remaining-*` shows that awork counted more than our log holds, the difference
  (other integrations of the workspace) is added to the log as "outside" entries at the current
  time, so the fleet slows down. They age out of the windows like our own entries: nothing
  throttles for longer than one window after the last observation. awork's count is compared
  with our log over the whole window plus a look-back (the request's age and the send-time
  spread), not with awork's clock-aligned window, so the estimate never depends on clock
  agreement and is a lower bound: it never throttles for usage that did not happen, but while
  our own fleet runs near the limit it cannot tell outside usage apart, and a 429 pause is
  then the backstop.

Cost: the script reads the state hash (pause, learned limits, member counter, pacing) with one
HMGET and writes what changed with one HSET; old log entries are trimmed at most once a second
and expiries pushed out about once per 5 s, and every count has explicit bounds so that neither
changes a decision. A granted acquire runs 7 Redis commands, a refused one 2-6, an observe of a
2xx with rate-limit headers 4 (the head of ratelimit.lua counts them). Changing this layout
across a rolling upgrade: both versions share the two logs, but not pauses, learned limits or
pacing, until every worker runs the same version (see ratelimit.lua).

Reading awork's headers (the pause a 429 asks for, the figures `observe()` hands the script):
`workers.ratelimit_headers`. Limits are `WorkspaceLimits` (see `workers.limits_config`): effective limit =
floor(awork's limit * margin), default margin 0.97.

What callers must do:

* Call `acquire()` before EVERY awork API request, retries included (each attempt is a request
  to awork). Blob PUTs to the upload URL go to Azure, not awork's gateway: no token.
* Call `observe()` after every awork response, success or error, with its status and headers;
  for slow requests (streamed multipart uploads) pass `elapsed` so that usage learning knows
  how old awork's figures are. A request that got no response has nothing to observe.
* Pass the same `WorkspaceLimits` for a workspace on every host (it is read from shared
  configuration); the limits are not stored in Redis.
* Treat a wait > ~1 s as "defer this step" (countdown = `suggested_countdown(wait)`, which adds
  jitter so deferred jobs do not all come back at the same instant), not as an error, and do
  not count it against the step's error retries. Short waits may be slept
  (`wait_for_token(..., max_wait=1.0)`).
* Redis errors propagate (redis.exceptions.ConnectionError and friends): the limiter fails
  closed, and the caller treats that as a transient error.
* Fairness between workspaces is automatic: separate keys, separate budgets. Within one
  workspace there is no queueing order: whoever asks first after a slot frees gets it.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from producers.keys import RATE_LIMIT_PREFIX, rate_limit_keys
from workers.errors import RateLimited
from workers.limits_config import (
    DEFAULT_MARGIN,
    PLANS,
    WorkspaceLimits,
    limits_for_workspace,
    limits_from_table,
)
from workers.ratelimit_headers import (
    MAX_PAUSE_SECONDS,
    observe_args,
    pause_from_headers,
)

log = logging.getLogger(__name__)

SCRIPT_PATH = Path(__file__).with_name("ratelimit.lua")

DEFAULT_PACE_TOLERANCE = 0.1
DEFAULT_LEARNED_TTL = 600.0
"""How long awork's advertised limits are remembered after the last response that carried them
(up to 5 s longer: ratelimit.lua writes an unchanged figure again at most every 5 s)."""


@dataclass(frozen=True)
class Decision:
    """What `try_acquire` decided.

    wait: 0.0 when the token was taken, else seconds until one could be (nothing was taken).
    blocked_by: None when granted, else which rule is the longest wait: "pause", "minute",
        "second" or "pace".
    server_time: the Redis time of the decision (unix seconds).
    """

    wait: float
    blocked_by: str | None
    server_time: float

    @property
    def granted(self) -> bool:
        return self.wait == 0.0


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode()
    return str(value)


def suggested_countdown(wait: float, max_countdown: float = MAX_PAUSE_SECONDS) -> float:
    """A Celery countdown for a step that must wait `wait` seconds for a token: the wait plus
    up to 10% + 0.5 s of jitter, so that the jobs deferred by one pause come back spread out."""
    jitter = random.uniform(0.0, 0.1 * wait + 0.5)
    return min(max_countdown, wait + jitter)


class RateLimiter:
    """The shared limiter. One instance per process is enough; it is thread-safe as far as the
    redis client is (redis-py's Redis with its connection pool is)."""

    def __init__(
        self,
        client: redis.Redis,
        prefix: str = RATE_LIMIT_PREFIX,
        *,
        pace_tolerance: float = DEFAULT_PACE_TOLERANCE,
        learned_ttl: float = DEFAULT_LEARNED_TTL,
        clock: Callable[[], float] | None = None,
    ) -> None:
        """`pace_tolerance`: how far (seconds) grants may run ahead of even spacing; 0 turns
        pacing off (the two windows still hold). `clock`: FOR TESTS ONLY, a function returning
        unix seconds that replaces the Redis server's TIME in the script."""
        self.client = client
        self.prefix = prefix
        self.pace_tolerance = pace_tolerance
        self.learned_ttl = learned_ttl
        self._clock = clock
        self._script = client.register_script(SCRIPT_PATH.read_text())

    # -- keys ---------------------------------------------------------------------------

    def keys(self, workspace: str) -> list[str]:
        """The workspace's keys, in the order ratelimit.lua expects them."""
        if not workspace or "{" in workspace or "}" in workspace:
            raise ValueError(f"workspace: expected a non-empty name without braces, got {workspace!r}")
        return rate_limit_keys(workspace, self.prefix)

    def _run(self, workspace: str, limits: WorkspaceLimits, op: str, *extra: str) -> list[Any]:
        now = "" if self._clock is None else str(round(self._clock() * 1_000_000))
        args = [
            op,
            now,
            str(limits.effective_per_minute),
            str(limits.effective_per_second),
            repr(float(limits.margin)),
            str(limits.per_minute),
            str(limits.per_second),
            *extra,
        ]
        result = self._script(keys=self.keys(workspace), args=args)
        return list(result)

    # -- the API --------------------------------------------------------------------------

    def try_acquire(self, workspace: str, limits: WorkspaceLimits) -> Decision:
        """Take a token now, or say how long to wait (taking nothing)."""
        tol = str(round(self.pace_tolerance * 1_000_000))
        wait_us, why, now_us = self._run(workspace, limits, "acquire", tol)
        wait = int(_text(wait_us)) / 1_000_000
        reason = _text(why)
        return Decision(
            wait=wait,
            blocked_by=None if reason == "ok" else reason,
            server_time=int(_text(now_us)) / 1_000_000,
        )

    def acquire(self, workspace: str, limits: WorkspaceLimits) -> float:
        """0.0 = token taken; > 0 = seconds to wait, nothing taken."""
        return self.try_acquire(workspace, limits).wait

    def wait_for_token(self, workspace: str, limits: WorkspaceLimits, max_wait: float) -> float:
        """Block until a token is taken, sleeping only while the total stays within `max_wait`.

        Returns 0.0 when the token was taken, else the wait still needed (> 0, nothing taken):
        the caller defers instead of sleeping longer. Sleeps carry a little jitter so that
        processes woken together do not retry in lockstep.
        """
        deadline = time.monotonic() + max_wait
        while True:
            wait = self.acquire(workspace, limits)
            if wait == 0.0:
                return 0.0
            left = deadline - time.monotonic()
            if wait > left:
                return wait
            time.sleep(min(left, wait + random.uniform(0.0, min(0.05, 0.1 * wait))))

    def acquire_or_raise(self, workspace: str, limits: WorkspaceLimits, max_wait: float) -> None:
        """`wait_for_token`, raising RateLimited(retry_after=wait) when it would wait longer."""
        wait = self.wait_for_token(workspace, limits, max_wait)
        if wait > 0:
            raise RateLimited(
                f"rate limiter: workspace {workspace!r} must wait {wait:.2f} s",
                code="rate_limiter",
                retry_after=wait,
            )

    def pause(self, workspace: str, seconds: float, reason: str = "429") -> None:
        """Stop every worker of the workspace for `seconds` (from now, Redis time). A longer
        pause already in force is kept."""
        if not seconds > 0 or math.isinf(seconds):
            raise ValueError(f"seconds: expected a positive finite number, got {seconds!r}")
        # The limits do not matter for a pause; any valid ones fill the common arguments.
        self._run(workspace, PLANS["standard"], "pause", str(round(seconds * 1_000_000)), reason)
        log.info("rate limiter: workspace %s paused for %.1f s (%s)", workspace, seconds, reason)

    def observe(
        self,
        workspace: str,
        limits: WorkspaceLimits,
        status: int,
        headers: Mapping[str, str],
        elapsed: float | None = None,
    ) -> None:
        """Learn from an awork response (call it after every one, success or not).

        429: pause the workspace (see `pause_from_headers`). Any status: remember awork's
        advertised limits (used when lower than ours). Non-429: add usage awork counted beyond
        our own log as outside usage. `elapsed`: the request's duration in seconds (e.g.
        `response.elapsed.total_seconds()`), needed for slow requests; by default 1 s is
        assumed, and responses older than the log's look-back are not used for usage learning.
        """
        reason, args = observe_args(status, headers, elapsed, self.learned_ttl)
        paused, added_m, added_s, _now = self._run(workspace, limits, "observe", *args)
        if status == 429:
            left = (int(_text(paused)) - int(_text(_now))) / 1_000_000
            log.warning("rate limiter: 429 for workspace %s, paused for %.1f s (%s)", workspace, left, reason)
        if int(added_m) or int(added_s):
            log.info(
                "rate limiter: workspace %s: %s/min and %s/s used by other clients",
                workspace,
                added_m,
                added_s,
            )

    def snapshot(self, workspace: str, limits: WorkspaceLimits) -> dict[str, Any]:
        """The workspace's state, for status pages and tests.

        used_last_minute / used_last_second: log entries in the windows (ours + outside);
        outside_last_minute / outside_last_second: of those, usage by other clients;
        paused_until: unix time (Redis clock) or None; pause_reason: str or None;
        learned_per_minute / learned_per_second: awork's advertised limits or None;
        effective_per_minute / effective_per_second: what acquire() enforces now;
        server_time: the Redis time of the snapshot.
        """
        (
            now,
            used_m,
            used_s,
            out_m,
            out_s,
            paused,
            reason,
            learned_m,
            learned_s,
            eff_m,
            eff_s,
        ) = self._run(workspace, limits, "snapshot")

        def opt_int(v: Any) -> int | None:
            s = _text(v)
            return int(s) if s else None

        paused_s = _text(paused)
        return {
            "workspace": workspace,
            "server_time": int(_text(now)) / 1_000_000,
            "used_last_minute": int(used_m),
            "used_last_second": int(used_s),
            "outside_last_minute": int(out_m),
            "outside_last_second": int(out_s),
            "paused_until": int(paused_s) / 1_000_000 if paused_s else None,
            "pause_reason": _text(reason) if paused_s else None,
            "learned_per_minute": opt_int(learned_m),
            "learned_per_second": opt_int(learned_s),
            "effective_per_minute": int(eff_m),
            "effective_per_second": int(eff_s),
            "configured_per_minute": limits.per_minute,
            "configured_per_second": limits.per_second,
            "margin": limits.margin,
        }


__all__ = [
    "DEFAULT_MARGIN",
    "Decision",
    "RateLimiter",
    "WorkspaceLimits",
    "limits_for_workspace",
    "limits_from_table",
    "pause_from_headers",
    "suggested_countdown",
]
