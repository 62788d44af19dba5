"""awork's rate limits as Kong applies them: per workspace, fixed second and minute windows."""

from __future__ import annotations

import time

import requests

from ops.sandbox.ratelimit import Limits, RateLimiter

from .conftest import KEY_A2, KEY_B, Api, assert_awork_error


def _early_in_second(margin: float = 0.5) -> None:
    """Sleep until a fresh wall-clock second so a burst stays inside one window."""
    frac = time.time() % 1
    if frac > 1 - margin:
        time.sleep(1 - frac + 0.01)


def _early_in_minute(margin: float = 3.0) -> None:
    sec = time.time() % 60
    if sec > 60 - margin:
        time.sleep(60 - sec + 0.05)


def _burst(api: Api, n: int) -> list[requests.Response]:
    return [api.request("POST", "/files/generateuploadurl") for _ in range(n)]


def test_success_carries_rate_limit_headers(api: Api) -> None:
    api.sb.set_faults({"rate_limits": {"per_minute": 1000, "per_second": 50}})
    _early_in_second()
    r = api.request("POST", "/files/generateuploadurl")
    assert r.headers["X-RateLimit-Limit-Second"] == "50"
    assert r.headers["X-RateLimit-Remaining-Second"] == "49"
    assert r.headers["X-RateLimit-Limit-Minute"] == "1000"
    assert r.headers["X-RateLimit-Remaining-Minute"] == "999"
    assert r.headers["RateLimit-Limit"] == "50"
    assert r.headers["RateLimit-Remaining"] == "49"
    assert r.headers["RateLimit-Reset"] == "1"
    # errors of an authenticated request carry them too
    r = api.request("GET", "/nowhere")
    assert r.status_code == 404 and r.headers["X-RateLimit-Remaining-Second"] == "48"


def test_second_window(api: Api) -> None:
    api.sb.set_faults({"rate_limits": {"per_minute": 1000, "per_second": 5}})
    _early_in_minute()
    _early_in_second()
    rs = _burst(api, 7)
    assert [r.status_code for r in rs] == [200] * 5 + [429] * 2
    assert rs[4].headers["X-RateLimit-Remaining-Second"] == "0"
    limited = rs[5]
    assert_awork_error(limited, 429, "too-many-requests")
    assert limited.headers["RateLimit-Limit"] == "5"
    assert limited.headers["RateLimit-Remaining"] == "0"
    assert limited.headers["RateLimit-Reset"] == "1"
    assert limited.headers["X-RateLimit-Remaining-Second"] == "0"
    assert limited.headers["X-RateLimit-Remaining-Minute"] == "995"
    assert "Retry-After" not in limited.headers
    # the next second: allowed again, and the two refusals did not count
    time.sleep(1 - time.time() % 1 + 0.01)
    r = api.request("POST", "/files/generateuploadurl")
    assert r.status_code == 200
    assert r.headers["X-RateLimit-Remaining-Minute"] == "994"
    stats = api.sb.stats()
    assert stats["rate_limited"] == 2
    assert stats["rate_limited_by_workspace"] == {"ws-a": 2}
    assert stats["requests_by_workspace"]["ws-a"] == 8
    assert stats["statuses"]["429"] == 2


def test_minute_window(api: Api) -> None:
    api.sb.set_faults({"rate_limits": {"per_minute": 4, "per_second": 50}})
    _early_in_minute()
    rs = _burst(api, 5)
    assert [r.status_code for r in rs] == [200] * 4 + [429]
    r = rs[4]
    assert r.headers["RateLimit-Limit"] == "4"
    assert r.headers["RateLimit-Remaining"] == "0"
    assert r.headers["X-RateLimit-Remaining-Minute"] == "0"
    reset = int(r.headers["RateLimit-Reset"])
    expected = 60 - int(time.time() % 60)
    assert 1 <= reset <= 60 and abs(reset - expected) <= 1


def test_workspaces_are_limited_apart(api: Api) -> None:
    api.sb.set_faults({"rate_limits": {"per_minute": 3, "per_second": 50}})
    _early_in_minute()
    assert [r.status_code for r in _burst(api, 2)] == [200, 200]
    a2 = Api(api.sb, KEY_A2)  # same workspace, other key: shares the budget
    assert [r.status_code for r in _burst(a2, 2)] == [200, 429]
    b = Api(api.sb, KEY_B)
    assert [r.status_code for r in _burst(b, 3)] == [200] * 3
    assert api.sb.stats()["rate_limited_by_workspace"] == {"ws-a": 1}


def test_workspace_override_and_retry_after(api: Api) -> None:
    api.sb.set_faults({
        "rate_limits": {"per_minute": 1000, "per_second": 50,
                        "workspaces": {"ws-b": {"per_minute": 3000, "per_second": 2}}},
        "retry_after_header": True,
    })
    _early_in_minute()
    _early_in_second()
    b = Api(api.sb, KEY_B)
    rs = _burst(b, 3)
    assert [r.status_code for r in rs] == [200, 200, 429]
    assert rs[0].headers["X-RateLimit-Limit-Minute"] == "3000"
    assert rs[2].headers["Retry-After"] == "1"
    assert _burst(api, 1)[0].headers["X-RateLimit-Limit-Second"] == "50"


def test_unauthenticated_requests_do_not_count(sb) -> None:  # type: ignore[no-untyped-def]
    sb.set_faults({"rate_limits": {"per_minute": 1000, "per_second": 2}})
    _early_in_second()
    anon = Api(sb, "wrong-key")
    assert {r.status_code for r in _burst(anon, 5)} == {401}
    assert [r.status_code for r in _burst(Api(sb), 2)] == [200, 200]


# --- the limiter itself, with a fake clock -----------------------------------------------------


def test_kong_headers_pick_the_tighter_window() -> None:
    lim = RateLimiter(Limits(per_minute=10, per_second=3))
    t = 600.2  # 10 minutes exactly plus 0.2 s
    d = lim.hit("w", t)
    assert d.allowed
    assert d.headers["X-RateLimit-Remaining-Second"] == "2"
    assert d.headers["X-RateLimit-Remaining-Minute"] == "9"
    assert d.headers["RateLimit-Limit"] == "3" and d.headers["RateLimit-Reset"] == "1"
    lim.hit("w", t + 0.1)
    lim.hit("w", t + 0.2)
    d = lim.hit("w", t + 0.3)
    assert not d.allowed and d.headers["X-RateLimit-Remaining-Minute"] == "7"
    # seven more, one per second: the minute window becomes the tighter one
    for s in range(1, 8):
        d = lim.hit("w", t + s)
        assert d.allowed
    assert d.headers["RateLimit-Limit"] == "10" and d.headers["RateLimit-Remaining"] == "0"
    assert d.headers["X-RateLimit-Remaining-Second"] == "2"
    d = lim.hit("w", t + 30.5)
    assert not d.allowed
    assert d.headers["RateLimit-Limit"] == "10"
    assert d.headers["RateLimit-Reset"] == str(60 - 30)
    d = lim.hit("w", 660.0)  # next minute
    assert d.allowed and d.headers["X-RateLimit-Remaining-Minute"] == "9"


def test_tie_goes_to_the_minute_window() -> None:
    lim = RateLimiter(Limits(per_minute=5, per_second=5))
    d = lim.hit("w", 1000.0)
    assert d.headers["RateLimit-Limit"] == "5"
    assert d.headers["RateLimit-Reset"] == str(60 - (1000 % 60))
