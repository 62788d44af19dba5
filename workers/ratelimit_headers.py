"""Reading awork's answers for the rate limiter (workers/ratelimit.py): how long a 429 pauses
the workspace, and what a response's x-ratelimit-* headers and age tell ratelimit.lua.

awork sends ``x-ratelimit-limit-{minute,second}`` and ``x-ratelimit-remaining-{minute,second}``
on its answers, and ``Retry-After`` or ``ratelimit-reset`` on a 429. Its figures are as old as
the request: `elapsed` (or DEFAULT_ELAPSED) plus the slack below bounds how far back in the
log they are compared.
"""

from __future__ import annotations

import email.utils
import logging
import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime

log = logging.getLogger("workers.ratelimit")

DEFAULT_PAUSE_SECONDS = 5.0
"""Pause after a 429 that says neither Retry-After nor ratelimit-reset (nor that the minute
window is spent)."""
MIN_PAUSE_SECONDS = 1.0
"""awork's figures are whole seconds; a reset of 0 still means "not this second"."""
MAX_PAUSE_SECONDS = 600.0
"""A pause from a header is capped here (awork's windows are at most a minute; a bigger figure
is a bug somewhere, and a day-long stop of a workspace should be an operator's decision)."""
DEFAULT_ELAPSED = 1.0
"""Assumed age of awork's figures when observe() is not told the request's duration."""
OBSERVE_SLACK_MINUTE = 1.0
OBSERVE_SLACK_SECOND = 0.25
"""Spread of the time between a grant and its arrival at awork, for usage learning."""
MAX_LOOKBACK_MINUTE = 10.0
MAX_LOOKBACK_SECOND = 3.0
"""Beyond these (request duration + slack) awork's figures are too old to compare: skipped.
They match the retention beyond the window in ratelimit.lua."""

_NUMBER = re.compile(r"^\s*(-?\d+(?:\.\d+)?)")


def _number(raw: str | None) -> float | None:
    """The leading number of a header value ("50", "12.5", "1000, 1000;w=60"), or None."""
    if raw is None:
        return None
    m = _NUMBER.match(raw)
    if not m:
        return None
    return float(m.group(1))


def _retry_after(raw: str | None) -> float | None:
    """Retry-After in seconds: either delta-seconds or an HTTP date (against the local clock,
    the only one that can read a date)."""
    if raw is None:
        return None
    try:
        seconds = float(raw.strip())
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return (when - datetime.now(UTC)).total_seconds()


def pause_from_headers(headers: Mapping[str, str]) -> tuple[float | None, str]:
    """How long a 429 with these headers should pause the workspace, and why.

    Retry-After and ratelimit-reset: the longer of those present (waiting for the longer one
    honours both). Neither: if x-ratelimit-remaining-minute is 0, until the next minute of
    the Redis clock (returned as None: the script computes it); if only the second window is
    spent, one second; otherwise DEFAULT_PAUSE_SECONDS. Capped to
    [MIN_PAUSE_SECONDS, MAX_PAUSE_SECONDS].
    """
    h = {k.lower(): v for k, v in headers.items()}
    candidates: list[tuple[float, str]] = []
    ra = _retry_after(h.get("retry-after"))
    if ra is not None:
        candidates.append((ra, "retry-after"))
    reset = _number(h.get("ratelimit-reset"))
    if reset is not None:
        candidates.append((reset, "ratelimit-reset"))
    if candidates:
        seconds, source = max(candidates)
        if seconds > MAX_PAUSE_SECONDS:
            log.warning("429 asks for a %.0f s pause; capped at %.0f s", seconds, MAX_PAUSE_SECONDS)
        return min(max(seconds, MIN_PAUSE_SECONDS), MAX_PAUSE_SECONDS), f"429 {source}"
    if _number(h.get("x-ratelimit-remaining-minute")) == 0:
        return None, "429 minute spent"
    if _number(h.get("x-ratelimit-remaining-second")) == 0:
        return MIN_PAUSE_SECONDS, "429 second spent"
    return DEFAULT_PAUSE_SECONDS, "429 no reset header"


def observe_args(
    status: int, headers: Mapping[str, str], elapsed: float | None, learned_ttl: float
) -> tuple[str, list[str]]:
    """(pause reason, the arguments of ratelimit.lua's `observe` after the common ones) for one
    awork response: the pause a 429 asks for (-1: until the next minute), awork's limits and
    remaining counts, whether to learn outside usage (not from a 429), the look-backs in
    microseconds (1e18: too old to compare) and how long learned limits are kept (ms)."""
    h = {k.lower(): v for k, v in headers.items()}
    pause_us = ""
    reason = ""
    if status == 429:
        seconds, reason = pause_from_headers(h)
        pause_us = "-1" if seconds is None else str(round(seconds * 1_000_000))
    age = DEFAULT_ELAPSED if elapsed is None else max(0.0, elapsed)
    look_m = age + OBSERVE_SLACK_MINUTE
    look_s = age + OBSERVE_SLACK_SECOND
    if look_m > MAX_LOOKBACK_MINUTE:
        look_m = math.inf
    if look_s > MAX_LOOKBACK_SECOND:
        look_s = math.inf

    def num(name: str) -> str:
        value = _number(h.get(name))
        return "" if value is None else str(int(value))

    def us(seconds: float) -> str:
        return "1e18" if math.isinf(seconds) else str(round(seconds * 1_000_000))

    return reason, [
        pause_us,
        reason,
        num("x-ratelimit-limit-minute"),
        num("x-ratelimit-remaining-minute"),
        num("x-ratelimit-limit-second"),
        num("x-ratelimit-remaining-second"),
        "1" if status != 429 else "0",
        us(look_m),
        us(look_s),
        str(round(learned_ttl * 1000)),
    ]
