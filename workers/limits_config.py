"""Per-workspace rate-limit settings: plan presets, the safety margin, TOML tables, env overrides.

awork counts requests per workspace (all integrations of that workspace share the budget):
1000 requests/minute on Basic/Business/Professional plans ("standard" here), 3000/minute on
Enterprise plans, and at most 50/second on every plan.

A workspace's table in AWORK_WORKSPACES_FILE may carry these keys (all optional; other keys of
the table, such as where its API key comes from, are not ours and are ignored):

    [workspaces.acme]
    plan = "enterprise"      # "standard" (default) or "enterprise"
    per_minute = 3000        # overrides the plan's figure
    per_second = 50          # overrides the plan's figure
    margin = 0.97            # fraction of the limits the fleet may use, 0 < margin <= 1

The `default` workspace (the one AWORK_API_KEY belongs to) also reads the environment:
AWORK_RATE_LIMIT_PER_MINUTE, AWORK_RATE_LIMIT_PER_SECOND and AWORK_RATE_LIMIT_MARGIN, which win
over its table.
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

from producers.config import DEFAULT_WORKSPACE, ConfigError

DEFAULT_MARGIN = 0.97
"""Why 0.97 (970/min and 48/s on a standard plan, 2910/min and 48/s on enterprise):

The limiter guarantees its counts at the moment a token is handed out, but awork counts a request
when it reaches the gateway, a network trip later. Requests whose trip times differ can swap
sides of awork's window boundary, so the gateway can see a few more in one of its windows than
we granted in any interval of that length. The 3% held back absorbs that: at the 48/s burst
rate, 30 spare requests per minute cover ~0.6 s of trip-time spread on the 1000/min plan (90
spare, ~1.9 s, on enterprise), and 2 spare per second cover ~40 ms of spread between requests
that are paced evenly (which the limiter does). It also leaves a sliver for another integration
of the same workspace between two of our observations of its usage. The cost is 3% of peak
throughput; a 429 costs a whole workspace pause, so this is the cheaper side to err on.
"""

_EPS = 1e-9


def effective_limit(limit: int, margin: float) -> int:
    """floor(limit * margin), at least 1 (a limit that rounds to 0 would stop all traffic)."""
    return max(1, math.floor(limit * margin + _EPS))


@dataclass(frozen=True)
class WorkspaceLimits:
    """awork's limits for one workspace, and the share of them the fleet may use.

    `per_minute` / `per_second` are awork's figures for the plan; the limiter enforces
    `effective_per_minute` / `effective_per_second` = floor(limit * margin) (at least 1).
    See DEFAULT_MARGIN for why the default margin is 0.97.
    """

    per_minute: int
    per_second: int
    margin: float = DEFAULT_MARGIN

    def __post_init__(self) -> None:
        for name in ("per_minute", "per_second"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}: expected a positive whole number, got {value!r}")
        m = self.margin
        if isinstance(m, bool) or not isinstance(m, int | float) or not 0 < m <= 1:
            raise ConfigError(f"margin: expected a number with 0 < margin <= 1, got {m!r}")

    @property
    def effective_per_minute(self) -> int:
        return effective_limit(self.per_minute, self.margin)

    @property
    def effective_per_second(self) -> int:
        return effective_limit(self.per_second, self.margin)

    @classmethod
    def standard(cls, margin: float = DEFAULT_MARGIN) -> WorkspaceLimits:
        """Basic / Business / Professional plans: 1000/minute, 50/second."""
        return cls(per_minute=1000, per_second=50, margin=margin)

    @classmethod
    def enterprise(cls, margin: float = DEFAULT_MARGIN) -> WorkspaceLimits:
        """Enterprise plans: 3000/minute, 50/second."""
        return cls(per_minute=3000, per_second=50, margin=margin)


PLANS: dict[str, WorkspaceLimits] = {
    "standard": WorkspaceLimits.standard(),
    "enterprise": WorkspaceLimits.enterprise(),
}
# awork's own plan names map onto the two rate tiers.
PLAN_ALIASES = {"basic": "standard", "business": "standard", "professional": "standard"}

TABLE_KEYS = ("plan", "per_minute", "per_second", "margin")

ENV_PER_MINUTE = "AWORK_RATE_LIMIT_PER_MINUTE"
ENV_PER_SECOND = "AWORK_RATE_LIMIT_PER_SECOND"
ENV_MARGIN = "AWORK_RATE_LIMIT_MARGIN"


def _positive_int(where: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}: expected a positive whole number, got {value!r}")
    return value


def _margin(where: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise ConfigError(f"{where}: expected a number with 0 < margin <= 1, got {value!r}")
    return float(value)


def limits_from_table(table: Mapping[str, object], where: str = "workspace") -> WorkspaceLimits:
    """WorkspaceLimits from a workspace's TOML table (keys: plan, per_minute, per_second, margin).

    `where` prefixes error messages, e.g. "workspaces.acme", so that they name the field:
    `workspaces.acme.per_minute: expected a positive whole number, got '1000'`.
    Unknown keys are left alone (the table holds other settings too), except near-misses of
    ours such as `per_minut`, which are refused rather than silently ignored.
    """
    for key in table:
        if key in TABLE_KEYS:
            continue
        close = difflib.get_close_matches(str(key), TABLE_KEYS, n=1, cutoff=0.8)
        if close:
            raise ConfigError(f"{where}.{key}: unknown setting; did you mean {close[0]!r}?")

    plan_raw = table.get("plan", "standard")
    if not isinstance(plan_raw, str):
        raise ConfigError(f"{where}.plan: expected a string, got {plan_raw!r}")
    plan = PLAN_ALIASES.get(plan_raw.strip().lower(), plan_raw.strip().lower())
    if plan not in PLANS:
        choices = ", ".join(sorted(PLANS))
        raise ConfigError(f"{where}.plan: expected one of {choices}, got {plan_raw!r}")
    base = PLANS[plan]

    per_minute = base.per_minute
    per_second = base.per_second
    margin = base.margin
    if "per_minute" in table:
        per_minute = _positive_int(f"{where}.per_minute", table["per_minute"])
    if "per_second" in table:
        per_second = _positive_int(f"{where}.per_second", table["per_second"])
    if "margin" in table:
        margin = _margin(f"{where}.margin", table["margin"])
    return WorkspaceLimits(per_minute=per_minute, per_second=per_second, margin=margin)


def apply_env_overrides(limits: WorkspaceLimits, environ: Mapping[str, str] | None = None) -> WorkspaceLimits:
    """The AWORK_RATE_LIMIT_* variables applied on top of `limits` (blank = not set)."""
    env = os.environ if environ is None else environ
    per_minute, per_second, margin = limits.per_minute, limits.per_second, limits.margin
    raw = env.get(ENV_PER_MINUTE, "").strip()
    if raw:
        per_minute = _positive_int(ENV_PER_MINUTE, _parse_int(ENV_PER_MINUTE, raw))
    raw = env.get(ENV_PER_SECOND, "").strip()
    if raw:
        per_second = _positive_int(ENV_PER_SECOND, _parse_int(ENV_PER_SECOND, raw))
    raw = env.get(ENV_MARGIN, "").strip()
    if raw:
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{ENV_MARGIN}: expected a number, got {raw!r}") from None
        margin = _margin(ENV_MARGIN, value)
    return WorkspaceLimits(per_minute=per_minute, per_second=per_second, margin=margin)


def _parse_int(name: str, raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name}: expected a whole number, got {raw!r}") from None


def limits_for_workspace(
    name: str,
    table: Mapping[str, object] | None = None,
    environ: Mapping[str, str] | None = None,
) -> WorkspaceLimits:
    """The limits for workspace `name`: its table (or the standard plan), plus, for the
    `default` workspace only, the AWORK_RATE_LIMIT_* environment overrides."""
    limits = limits_from_table(table, f"workspaces.{name}") if table else PLANS["standard"]
    if name == DEFAULT_WORKSPACE:
        limits = apply_env_overrides(limits, environ)
    return limits


__all__ = [
    "DEFAULT_MARGIN",
    "ENV_MARGIN",
    "ENV_PER_MINUTE",
    "ENV_PER_SECOND",
    "PLANS",
    "WorkspaceLimits",
    "apply_env_overrides",
    "effective_limit",
    "limits_for_workspace",
    "limits_from_table",
]
