"""Unit tests of the fleet-wide rate limiter's logic, on fakeredis (its Lua runs the real script).

Time is driven by a fake clock handed to the script (the test-only `clock` override), so the
minute window is tested without waiting a minute.
"""

from __future__ import annotations

import os
import random
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import fakeredis
import pytest

from producers.config import ConfigError
from workers.errors import RateLimited
from workers.limits_config import (
    DEFAULT_MARGIN,
    WorkspaceLimits,
    apply_env_overrides,
    limits_for_workspace,
    limits_from_table,
)
from workers.ratelimit import RateLimiter, suggested_countdown
from workers.ratelimit_headers import DEFAULT_PAUSE_SECONDS, MAX_PAUSE_SECONDS, pause_from_headers

T0 = 1_800_000_000.0  # a whole minute: 1_800_000_000 % 60 == 0
US = 1e-6


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def set(self, t: float) -> None:
        self.t = t


@pytest.fixture
def r() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis()


@pytest.fixture
def clock() -> Clock:
    return Clock()


def limiter(r: fakeredis.FakeRedis, clock: Clock | None = None, pace: float = 0.0) -> RateLimiter:
    return RateLimiter(r, clock=clock, pace_tolerance=pace)


# -- configuration --------------------------------------------------------------------------


def test_presets_and_effective_limits() -> None:
    std, ent = WorkspaceLimits.standard(), WorkspaceLimits.enterprise()
    assert (std.per_minute, std.per_second, std.margin) == (1000, 50, DEFAULT_MARGIN)
    assert (ent.per_minute, ent.per_second) == (3000, 50)
    assert (std.effective_per_minute, std.effective_per_second) == (970, 48)
    assert ent.effective_per_minute == 2910
    assert WorkspaceLimits(1000, 50, 1.0).effective_per_minute == 1000
    # A limit that would round to zero still lets one request through.
    assert WorkspaceLimits(1, 1, 0.5).effective_per_second == 1


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"per_minute": 0, "per_second": 5}, "per_minute"),
        ({"per_minute": 10, "per_second": -1}, "per_second"),
        ({"per_minute": 10, "per_second": 5, "margin": 0}, "margin"),
        ({"per_minute": 10, "per_second": 5, "margin": 1.5}, "margin"),
    ],
)
def test_limits_validate(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        WorkspaceLimits(**kwargs)  # type: ignore[arg-type]


def test_limits_from_table() -> None:
    assert limits_from_table({}) == WorkspaceLimits.standard()
    assert limits_from_table({"plan": "enterprise"}) == WorkspaceLimits.enterprise()
    assert limits_from_table({"plan": "Business"}) == WorkspaceLimits.standard()
    got = limits_from_table({"plan": "enterprise", "per_second": 40, "margin": 0.9, "api_key_env": "X"})
    assert got == WorkspaceLimits(3000, 40, 0.9)
    assert limits_from_table({"per_minute": 500, "margin": 1}) == WorkspaceLimits(500, 50, 1.0)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"plan": "gold"}, r"workspaces\.acme\.plan: expected one of enterprise, standard"),
        ({"plan": 3}, r"workspaces\.acme\.plan: expected a string"),
        ({"per_minute": "1000"}, r"workspaces\.acme\.per_minute: expected a positive whole"),
        ({"per_minute": True}, r"workspaces\.acme\.per_minute"),
        ({"per_second": 0}, r"workspaces\.acme\.per_second"),
        ({"margin": 1.2}, r"workspaces\.acme\.margin: expected a number with 0 < margin <= 1"),
        ({"margin": "0.9"}, r"workspaces\.acme\.margin"),
        ({"per_minut": 5}, r"workspaces\.acme\.per_minut: unknown setting; did you mean 'per_minute'"),
    ],
)
def test_limits_from_table_errors_name_the_field(table: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        limits_from_table(table, "workspaces.acme")


def test_env_overrides_apply_to_default_workspace_only() -> None:
    env = {
        "AWORK_RATE_LIMIT_PER_MINUTE": "3000",
        "AWORK_RATE_LIMIT_PER_SECOND": " 40 ",
        "AWORK_RATE_LIMIT_MARGIN": "0.9",
    }
    assert limits_for_workspace("default", None, env) == WorkspaceLimits(3000, 40, 0.9)
    assert limits_for_workspace("other", None, env) == WorkspaceLimits.standard()
    table = {"plan": "enterprise", "per_second": 30}
    assert limits_for_workspace("other", table, env) == WorkspaceLimits(3000, 30)
    assert limits_for_workspace("default", table, {"AWORK_RATE_LIMIT_PER_MINUTE": ""}) == (
        WorkspaceLimits(3000, 30)
    )


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"AWORK_RATE_LIMIT_PER_MINUTE": "lots"}, "AWORK_RATE_LIMIT_PER_MINUTE"),
        ({"AWORK_RATE_LIMIT_PER_SECOND": "0"}, "AWORK_RATE_LIMIT_PER_SECOND"),
        ({"AWORK_RATE_LIMIT_MARGIN": "x"}, "AWORK_RATE_LIMIT_MARGIN"),
        ({"AWORK_RATE_LIMIT_MARGIN": "2"}, "AWORK_RATE_LIMIT_MARGIN"),
    ],
)
def test_env_override_errors_name_the_variable(env: dict[str, str], name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        apply_env_overrides(WorkspaceLimits.standard(), env)


# -- the two windows ----------------------------------------------------------------------


def test_second_window_and_its_wait(r: fakeredis.FakeRedis, clock: Clock) -> None:
    rl = limiter(r, clock)
    lim = WorkspaceLimits(1000, 5, 1.0)
    for i in range(5):
        clock.set(T0 + i * 0.2)
        assert rl.acquire("w", lim) == 0.0
    clock.set(T0 + 0.9)
    d = rl.try_acquire("w", lim)
    assert d.blocked_by == "second"
    # The oldest grant (T0) leaves [now - 1 s, now] one microsecond after T0 + 1 s.
    assert d.wait == pytest.approx(0.1 + US, abs=1e-7)
    clock.set(T0 + 1.0)  # closed interval: T0 still counts
    assert rl.acquire("w", lim) == pytest.approx(US, abs=1e-7)
    clock.set(T0 + 1.0 + US)
    assert rl.acquire("w", lim) == 0.0
    # Nothing is written while refused: the refused calls took no token.
    assert rl.snapshot("w", lim)["used_last_second"] == 5


def test_minute_window_and_its_wait(r: fakeredis.FakeRedis, clock: Clock) -> None:
    rl = limiter(r, clock)
    lim = WorkspaceLimits(10, 100, 1.0)
    for i in range(10):
        clock.set(T0 + i)
        assert rl.acquire("w", lim) == 0.0
    clock.set(T0 + 10)
    d = rl.try_acquire("w", lim)
    assert d.blocked_by == "minute"
    assert d.wait == pytest.approx(50 + US, abs=1e-7)
    clock.set(T0 + 60)
    assert rl.acquire("w", lim) == pytest.approx(US, abs=1e-7)
    clock.set(T0 + 60 + US)
    assert rl.acquire("w", lim) == 0.0
    # Full again: the next slot is when the grant at T0 + 1 leaves.
    assert rl.acquire("w", lim) == pytest.approx(1.0, abs=1e-5)


def test_wait_is_the_longer_of_both_windows(r: fakeredis.FakeRedis, clock: Clock) -> None:
    rl = limiter(r, clock)
    lim = WorkspaceLimits(4, 2, 1.0)
    clock.set(T0)
    assert rl.acquire("w", lim) == 0.0
    assert rl.acquire("w", lim) == 0.0
    d = rl.try_acquire("w", lim)
    assert (d.blocked_by, d.wait) == ("second", pytest.approx(1 + US, abs=1e-7))
    clock.set(T0 + 2)
    assert rl.acquire("w", lim) == 0.0
    assert rl.acquire("w", lim) == 0.0
    d = rl.try_acquire("w", lim)
    # Both windows are full; the minute frees later (T0 + 60) than the second (T0 + 3).
    assert d.blocked_by == "minute"
    assert d.wait == pytest.approx(58 + US, abs=1e-7)


def _max_in_any_interval(times_us: list[int], length_us: int) -> int:
    times = sorted(times_us)
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] < t - length_us:
            j += 1
        best = max(best, i - j + 1)
    return best


@pytest.mark.parametrize("pace", [0.0, 0.1])
def test_no_interval_ever_exceeds_the_limits(r: fakeredis.FakeRedis, pace: float) -> None:
    """Random demand over three simulated minutes: every closed 1 s and 60 s interval holds at
    most the limit, and a caller that waits what it is told gets the full budget."""
    rng = random.Random(7)
    clock = Clock()
    rl = limiter(r, clock, pace)
    lim = WorkspaceLimits(120, 6, 1.0)
    granted: list[int] = []
    t_us = int(T0 * 1e6)
    end = t_us + 180 * 1_000_000
    while t_us < end:
        clock.set(t_us / 1e6)
        wait = rl.acquire("w", lim)
        if wait == 0.0:
            granted.append(t_us)
            t_us += rng.choice([0, 0, 1, 10, 1000, 50_000, 300_000])
        else:
            # Sometimes come back exactly when told, sometimes a little later or earlier.
            t_us += max(1, round(wait * 1e6) + rng.choice([0, 0, 0, 1, 999, -1]))
    assert _max_in_any_interval(granted, 1_000_000) <= 6
    assert _max_in_any_interval(granted, 60_000_000) <= 120
    # The minute limit binds: three minutes allow 3 x 120.
    assert len(granted) >= 0.95 * 360


def test_pacing_spreads_a_burst(r: fakeredis.FakeRedis, clock: Clock) -> None:
    rl = limiter(r, clock, pace=0.1)
    lim = WorkspaceLimits(10_000, 20, 1.0)  # 50 ms apart, up to 100 ms ahead: a burst of 3
    assert [rl.acquire("w", lim) for _ in range(3)] == [0.0, 0.0, 0.0]
    d = rl.try_acquire("w", lim)
    assert (d.blocked_by, d.wait) == ("pace", pytest.approx(0.05, abs=1e-6))
    clock.set(T0 + 0.05)
    assert rl.acquire("w", lim) == 0.0
    assert rl.acquire("w", lim) == pytest.approx(0.05, abs=1e-6)


def test_entries_beyond_the_future_bound_do_not_count(r: fakeredis.FakeRedis, clock: Clock) -> None:
    """Entries more than FUTURE (1 s) after now (the Redis clock stepped back) neither block nor
    show in a snapshot; those within 1 s count. Trimming is not needed for this: every count
    stops at now + 1 s."""
    rl = limiter(r, clock)
    lim = WorkspaceLimits(10, 5, 1.0)
    minute_log, second_log = rl.keys("w")[:2]
    ahead = {f"x{i}": (T0 + 1.0) * 1e6 + 1 for i in range(10)}  # 1 s + 1 us ahead
    r.zadd(minute_log, ahead)
    r.zadd(second_log, ahead)
    snap = rl.snapshot("w", lim)
    assert (snap["used_last_minute"], snap["used_last_second"]) == (0, 0)
    assert rl.acquire("w", lim) == 0.0
    r.zadd(second_log, {"x-edge": (T0 + 1.0) * 1e6})  # exactly 1 s ahead: counts
    assert rl.snapshot("w", lim)["used_last_second"] == 2


def test_a_clock_step_back_drops_grants_from_the_future(r: fakeredis.FakeRedis, clock: Clock) -> None:
    rl = limiter(r, clock)
    lim = WorkspaceLimits(10, 5, 1.0)
    for _ in range(5):
        assert rl.acquire("w", lim) == 0.0
    clock.set(T0 - 0.5)  # stepped back less than 1 s: the five still count
    d = rl.try_acquire("w", lim)
    assert (d.blocked_by, d.wait) == ("second", pytest.approx(1.5 + US, abs=1e-7))
    clock.set(T0 - 5)  # stepped back 5 s: the five are beyond now + 1 s
    assert rl.acquire("w", lim) == 0.0
    # ...and were removed at first sight, as a trim on every call would have: they do not come
    # back when the clock catches up with them.
    clock.set(T0 + 0.5)
    snap = rl.snapshot("w", lim)
    assert (snap["used_last_minute"], snap["used_last_second"]) == (1, 0)
    assert r.zcard(rl.keys("w")[0]) == 1


def test_old_entries_are_trimmed(r: fakeredis.FakeRedis, clock: Clock) -> None:
    """Trimming runs at most once a second, but it runs: the logs hold what their retention
    (70 s, 4 s) plus one trim period allows, not every grant ever made."""
    rl = limiter(r, clock)
    lim = WorkspaceLimits(1000, 50, 1.0)
    for i in range(400):  # 200 s at 2 grants a second
        clock.set(T0 + i * 0.5)
        assert rl.acquire("w", lim) == 0.0
    minute_log, second_log = rl.keys("w")[:2]
    assert r.zcard(minute_log) <= 2 * 71 + 1
    assert r.zcard(second_log) <= 2 * 5 + 1


# -- pause --------------------------------------------------------------------------------


def test_pause_stops_the_workspace_and_resumes_by_itself(r: fakeredis.FakeRedis, clock: Clock) -> None:
    rl = limiter(r, clock)
    lim = WorkspaceLimits(1000, 50, 1.0)
    rl.pause("w", 5, "429 test")
    d = rl.try_acquire("w", lim)
    assert (d.blocked_by, d.wait) == ("pause", pytest.approx(5.0))
    snap = rl.snapshot("w", lim)
    assert snap["paused_until"] == pytest.approx(T0 + 5)
    assert snap["pause_reason"] == "429 test"
    # A shorter pause does not shorten it; a longer one extends it.
    clock.set(T0 + 1)
    rl.pause("w", 1, "short")
    assert rl.acquire("w", lim) == pytest.approx(4.0)
    rl.pause("w", 10, "long")
    assert rl.acquire("w", lim) == pytest.approx(10.0)
    assert rl.snapshot("w", lim)["pause_reason"] == "long"
    clock.set(T0 + 11)
    assert rl.acquire("w", lim) == 0.0
    snap = rl.snapshot("w", lim)
    assert snap["paused_until"] is None and snap["pause_reason"] is None
    # Another workspace never noticed.
    rl.pause("w", 30)
    assert rl.acquire("other", lim) == 0.0


def test_pause_rejects_nonsense(r: fakeredis.FakeRedis) -> None:
    rl = limiter(r)
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="seconds"):
            rl.pause("w", bad)
    with pytest.raises(ValueError, match="workspace"):
        rl.acquire("a}b", WorkspaceLimits.standard())


def test_pause_state_expires_with_the_pause(r: fakeredis.FakeRedis) -> None:
    # The pause lives in the state hash (keys()[2]), which lasts at least 1 s beyond the pause,
    # and (holding nothing else) at most REFRESH (5 s) more.
    rl = limiter(r)
    rl.pause("w", 3)
    state_key = rl.keys("w")[2]
    assert 4000 <= r.pttl(state_key) <= 9000
    rl.pause("w", 300)
    assert 301_000 <= r.pttl(state_key) <= 306_000


# -- observe: 429 -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "seconds", "reason"),
    [
        ({"RateLimit-Reset": "7", "RateLimit-Remaining": "0"}, 7.0, "429 ratelimit-reset"),
        ({"ratelimit-reset": "3", "Retry-After": "12"}, 12.0, "429 retry-after"),
        ({"ratelimit-reset": "30", "Retry-After": "2"}, 30.0, "429 ratelimit-reset"),
        ({"Retry-After": "4"}, 4.0, "429 retry-after"),
        ({"ratelimit-reset": "0"}, 1.0, "429 ratelimit-reset"),
        ({"ratelimit-reset": "86400"}, MAX_PAUSE_SECONDS, "429 ratelimit-reset"),
        ({}, DEFAULT_PAUSE_SECONDS, "429 no reset header"),
        ({"Retry-After": "soon"}, DEFAULT_PAUSE_SECONDS, "429 no reset header"),
        ({"x-ratelimit-remaining-second": "0", "x-ratelimit-remaining-minute": "9"}, 1.0, "429 second spent"),
        ({"x-ratelimit-remaining-minute": "0"}, None, "429 minute spent"),
    ],
)
def test_pause_from_headers(headers: dict[str, str], seconds: float | None, reason: str) -> None:
    assert pause_from_headers(headers) == (seconds, reason)


def test_retry_after_as_http_date() -> None:
    when = datetime.now(UTC) + timedelta(seconds=20)
    seconds, reason = pause_from_headers({"Retry-After": format_datetime(when, usegmt=True)})
    assert reason == "429 retry-after"
    assert seconds is not None and 18 <= seconds <= 20


@pytest.mark.parametrize(
    ("headers", "pause"),
    [
        ({"ratelimit-reset": "7"}, 7.0),
        ({"Retry-After": "12", "ratelimit-reset": "3"}, 12.0),
        ({}, DEFAULT_PAUSE_SECONDS),
        # Minute spent, no reset: until the next minute of the Redis clock, plus 1 s.
        ({"x-ratelimit-remaining-minute": "0"}, 60 - 15 + 1.0),
    ],
)
def test_observe_429_pauses(
    r: fakeredis.FakeRedis, clock: Clock, headers: dict[str, str], pause: float
) -> None:
    rl = limiter(r, clock)
    lim = WorkspaceLimits(1000, 50, 1.0)
    clock.set(T0 + 15)
    rl.observe("w", lim, 429, headers)
    d = rl.try_acquire("w", lim)
    assert d.blocked_by == "pause"
    assert d.wait == pytest.approx(pause)
    clock.set(T0 + 15 + pause + US)
    assert rl.acquire("w", lim) == 0.0


def test_observe_429_learns_limits_but_not_usage(r: fakeredis.FakeRedis, clock: Clock) -> None:
    rl = limiter(r, clock)
    lim = WorkspaceLimits(1000, 50, 1.0)
    rl.observe(
        "w",
        lim,
        429,
        {
            "ratelimit-reset": "2",
            "x-ratelimit-limit-minute": "600",
            "x-ratelimit-remaining-minute": "0",
            "x-ratelimit-limit-second": "50",
            "x-ratelimit-remaining-second": "40",
        },
    )
    snap = rl.snapshot("w", lim)
    assert snap["learned_per_minute"] == 600
    assert snap["effective_per_minute"] == 600
    # The pause covers the spent window; outside entries would throttle on after its reset.
    assert snap["outside_last_minute"] == 0 and snap["used_last_minute"] == 0


# -- observe: success ---------------------------------------------------------------------


def _ok_headers(limit_m: int, rem_m: int, limit_s: int, rem_s: int) -> dict[str, str]:
    return {
        "X-RateLimit-Limit-Minute": str(limit_m),
        "X-RateLimit-Remaining-Minute": str(rem_m),
        "X-RateLimit-Limit-Second": str(limit_s),
        "X-RateLimit-Remaining-Second": str(rem_s),
    }


def test_outside_usage_is_learned_once_and_slows_the_fleet(r: fakeredis.FakeRedis, clock: Clock) -> None:
    rl = limiter(r, clock)
    lim = WorkspaceLimits(100, 100, 1.0)
    for _ in range(3):
        assert rl.acquire("w", lim) == 0.0
    # awork counted 40 this minute and 15 this second; we sent 3.
    rl.observe("w", lim, 200, _ok_headers(100, 60, 100, 85))
    snap = rl.snapshot("w", lim)
    assert snap["outside_last_minute"] == 37
    assert snap["outside_last_second"] == 12
    assert snap["used_last_minute"] == 40
    assert snap["used_last_second"] == 15
    # The same figures again add nothing: the log already holds them.
    rl.observe("w", lim, 200, _ok_headers(100, 60, 100, 85))
    assert rl.snapshot("w", lim)["outside_last_minute"] == 37
    # A figure lower than our log (awork's window reset) adds nothing either.
    rl.observe("w", lim, 200, _ok_headers(100, 99, 100, 99))
    assert rl.snapshot("w", lim)["outside_last_minute"] == 37

    # Outside usage counts against the budget: 60 left this minute, not 97.
    clock.set(T0 + 2)
    granted = 0
    while rl.acquire("w", lim) == 0.0:
        granted += 1
    assert granted == 60
    d = rl.try_acquire("w", lim)
    assert d.blocked_by == "minute"
    # ...and it ages out like our own entries: nothing throttles past the window.
    clock.set(T0 + 62 + US)
    snap = rl.snapshot("w", lim)
    assert snap["outside_last_minute"] == 0 and snap["outside_last_second"] == 0
    assert rl.acquire("w", lim) == 0.0


def test_outside_usage_ages_out_of_the_second_window(r: fakeredis.FakeRedis, clock: Clock) -> None:
    rl = limiter(r, clock)
    lim = WorkspaceLimits(1000, 10, 1.0)
    rl.observe("w", lim, 200, {"x-ratelimit-remaining-second": "2"})  # limit from config: 10
    d = rl.try_acquire("w", lim)
    assert d.granted
    assert rl.try_acquire("w", lim).granted
    d = rl.try_acquire("w", lim)
    assert d.blocked_by == "second"
    assert d.wait == pytest.approx(1 + US, abs=1e-7)
    clock.set(T0 + 1 + US)
    assert rl.acquire("w", lim) == 0.0


def test_old_figures_are_not_used_for_usage(r: fakeredis.FakeRedis, clock: Clock) -> None:
    rl = limiter(r, clock)
    lim = WorkspaceLimits(100, 50, 1.0)
    # A streamed upload that took 30 s: awork's figures are too old to compare with our log.
    rl.observe("w", lim, 200, _ok_headers(100, 10, 50, 0), elapsed=30.0)
    snap = rl.snapshot("w", lim)
    assert snap["outside_last_minute"] == 0 and snap["outside_last_second"] == 0
    # Our own entries from up to elapsed + slack before the window are counted as ours.
    for i in range(10):
        clock.set(T0 + i * 0.1)
        rl.acquire("w", lim)
    clock.set(T0 + 63)  # our ten are out of the window, but within a 3 s + slack look-back
    rl.observe("w", lim, 200, _ok_headers(100, 90, 50, 50), elapsed=3.0)
    assert rl.snapshot("w", lim)["outside_last_minute"] == 0
    rl.observe("w", lim, 200, _ok_headers(100, 90, 50, 50), elapsed=0.1)
    assert rl.snapshot("w", lim)["outside_last_minute"] == 10


def test_learned_lower_limits_are_used(r: fakeredis.FakeRedis, clock: Clock) -> None:
    rl = RateLimiter(r, clock=clock, pace_tolerance=0.0, learned_ttl=30)
    lim = WorkspaceLimits(60, 20, 0.9)  # 54/min, 18/s
    rl.observe("w", lim, 200, {"x-ratelimit-limit-minute": "20", "x-ratelimit-limit-second": "5"})
    snap = rl.snapshot("w", lim)
    assert (snap["learned_per_minute"], snap["learned_per_second"]) == (20, 5)
    assert (snap["effective_per_minute"], snap["effective_per_second"]) == (18, 4)
    assert sum(rl.acquire("w", lim) == 0.0 for _ in range(10)) == 4
    assert r.pttl(rl.keys("w")[2]) > 30_000  # the state outlasts the learned limits
    # A higher advertised limit does not raise ours.
    rl.observe("w", lim, 200, {"x-ratelimit-limit-minute": "3000", "x-ratelimit-limit-second": "50"})
    snap = rl.snapshot("w", lim)
    assert (snap["effective_per_minute"], snap["effective_per_second"]) == (54, 18)
    # Kept learned_ttl after the last response that carried them, and at most 5 s longer (an
    # unchanged figure is written again only when its end comes nearer than learned_ttl).
    clock.set(T0 + 10)
    rl.observe("w", lim, 200, {"x-ratelimit-limit-minute": "20"})
    clock.set(T0 + 40)
    snap = rl.snapshot("w", lim)
    assert (snap["learned_per_minute"], snap["learned_per_second"]) == (20, 50)
    clock.set(T0 + 10 + 35 + US)
    snap = rl.snapshot("w", lim)
    assert (snap["learned_per_minute"], snap["learned_per_second"]) == (None, None)
    assert (snap["effective_per_minute"], snap["effective_per_second"]) == (54, 18)
    # A forgotten figure does not come back with the next one learned.
    rl.observe("w", lim, 200, {"x-ratelimit-limit-minute": "30"})
    snap = rl.snapshot("w", lim)
    assert (snap["learned_per_minute"], snap["learned_per_second"]) == (30, None)


def test_garbage_headers_are_ignored(r: fakeredis.FakeRedis) -> None:
    rl = limiter(r)
    lim = WorkspaceLimits(100, 10, 1.0)
    rl.observe("w", lim, 200, {"x-ratelimit-limit-minute": "many", "x-ratelimit-remaining-minute": ""})
    rl.observe("w", lim, 500, {})
    snap = rl.snapshot("w", lim)
    assert snap["learned_per_minute"] is None and snap["outside_last_minute"] == 0
    assert rl.acquire("w", lim) == 0.0


# -- keys, expiry, reload -----------------------------------------------------------------


def test_every_key_expires(r: fakeredis.FakeRedis) -> None:
    rl = RateLimiter(r, pace_tolerance=0.1)
    lim = WorkspaceLimits(100, 10, 1.0)
    for _ in range(5):
        rl.acquire("w", lim)
    rl.observe("w", lim, 200, _ok_headers(100, 50, 10, 2))
    rl.observe("w", lim, 429, {"ratelimit-reset": "2"})
    rl.acquire("w", lim)
    rl.snapshot("w", lim)
    keys = sorted(os.fsdecode(k) for k in r.keys("*"))
    assert keys == sorted(rl.keys("w"))
    assert all(k.startswith("awork:rl:{w}:") for k in keys)
    ttl = {k.rsplit(":", 1)[1]: r.pttl(k) for k in keys}
    assert all(v > 0 for v in ttl.values()), ttl
    # Expiries are set REFRESH (5 s) beyond the retention + 1 s, so that they need pushing out
    # only about once per REFRESH; the state outlasts the logs and the learned limits (600 s).
    assert 71_000 <= ttl["m"] <= 76_000
    assert 5_000 <= ttl["s"] <= 10_000
    assert max(ttl["m"], 601_000) <= ttl["state"] <= 611_000


def test_idle_workspace_leaves_nothing_behind(r: fakeredis.FakeRedis) -> None:
    rl = RateLimiter(r, pace_tolerance=0.1)
    lim = WorkspaceLimits(100, 10, 1.0)
    rl.acquire("w", lim)
    rl.pause("w", 0.2)
    for k in rl.keys("w"):  # fast-forward the expiries that a real minute would run out
        if r.exists(k):
            r.pexpire(k, 50)
    time.sleep(0.1)
    assert r.keys("*") == []
    # Refused calls and snapshots create nothing without an expiry.
    rl.snapshot("w", lim)
    assert r.keys("*") == []


def test_script_is_reloaded_after_flush(r: fakeredis.FakeRedis) -> None:
    rl = limiter(r)
    lim = WorkspaceLimits(100, 10, 1.0)
    assert rl.acquire("w", lim) == 0.0
    r.script_flush()
    assert rl.acquire("w", lim) == 0.0


def test_string_responses_client() -> None:
    rl = RateLimiter(fakeredis.FakeRedis(decode_responses=True))
    lim = WorkspaceLimits(100, 10, 1.0)
    assert rl.acquire("w", lim) == 0.0
    rl.observe("w", lim, 429, {"ratelimit-reset": "5"})
    snap = rl.snapshot("w", lim)
    assert snap["pause_reason"] == "429 ratelimit-reset"
    assert snap["used_last_minute"] == 1


def test_server_time_is_used_without_override(r: fakeredis.FakeRedis) -> None:
    rl = RateLimiter(r)
    d = rl.try_acquire("w", WorkspaceLimits(100, 10, 1.0))
    assert d.granted and abs(d.server_time - time.time()) < 5


# -- blocking helpers ---------------------------------------------------------------------


def test_wait_for_token_sleeps_short_waits_and_returns_long_ones(r: fakeredis.FakeRedis) -> None:
    rl = RateLimiter(r)
    lim = WorkspaceLimits(100, 10, 1.0)
    rl.pause("w", 0.3)
    start = time.monotonic()
    assert rl.wait_for_token("w", lim, max_wait=1.0) == 0.0
    assert 0.25 <= time.monotonic() - start < 1.0
    rl.pause("w", 5)
    start = time.monotonic()
    wait = rl.wait_for_token("w", lim, max_wait=1.0)
    assert 4 < wait <= 5
    assert time.monotonic() - start < 0.5  # no partial sleep before deferring
    with pytest.raises(RateLimited) as info:
        rl.acquire_or_raise("w", lim, max_wait=1.0)
    assert info.value.retry_after is not None and info.value.retry_after > 4


def test_suggested_countdown() -> None:
    for wait in (0.5, 10.0, 59.0):
        c = suggested_countdown(wait)
        assert wait <= c <= wait * 1.1 + 0.5
    assert suggested_countdown(10_000.0) == MAX_PAUSE_SECONDS
