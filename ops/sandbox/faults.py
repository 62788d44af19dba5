"""Seeded fault decisions, one random stream per route, so a failing run can be replayed.

Every request of a route draws the same three numbers (fault, jitter, drop point) whatever
the settings are, so the n-th request of a route meets the same fate for the same seed and
probabilities. Replays are exact for traffic that reaches each route in the same order
(sequential clients); concurrent clients may interleave differently.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .settings import FAULT_KINDS, Settings


@dataclass(frozen=True)
class Fault:
    kind: str | None  # one of settings.FAULT_KINDS, or None for a healthy request
    delay_s: float  # latency to add before anything else happens
    fraction: float  # for "drop" on a request with a body: how much of it to read first


@dataclass(frozen=True)
class _Plan:
    thresholds: tuple[tuple[float, str], ...]  # cumulative probability -> kind
    latency_s: float
    jitter_s: float


NO_FAULT = Fault(None, 0.0, 0.0)


class FaultInjector:
    def __init__(self, settings: Settings) -> None:
        self._rngs: dict[str, random.Random] = {}
        self._plans: dict[str, _Plan] = {}
        self.configure(settings, reseed=True)

    def configure(self, settings: Settings, reseed: bool) -> None:
        """Take new settings; `reseed` restarts every route's stream from `settings.seed`."""
        self.settings = settings
        self._plans.clear()
        if reseed:
            self._rngs.clear()

    def _plan(self, route: str) -> _Plan:
        plan = self._plans.get(route)
        if plan is None:
            s = self.settings
            own = s.routes.get(route)
            star = s.routes.get("*")
            thresholds: list[tuple[float, str]] = []
            total = 0.0
            for kind in FAULT_KINDS:
                p = None
                if own is not None:
                    p = own.probabilities.get(kind)
                if p is None and star is not None:
                    p = star.probabilities.get(kind)
                if p:
                    total += p
                    thresholds.append((total, kind))
            latency = s.latency_ms
            jitter = s.jitter_ms
            for rf in (star, own):
                if rf is not None and rf.latency_ms is not None:
                    latency = rf.latency_ms
                if rf is not None and rf.jitter_ms is not None:
                    jitter = rf.jitter_ms
            plan = self._plans[route] = _Plan(tuple(thresholds), latency / 1000, jitter / 1000)
        return plan

    def decide(self, route: str) -> Fault:
        """Always draws, even with no faults set, so the n-th request since a (re)seed is
        the n-th draw of its route whatever was configured in between."""
        rng = self._rngs.get(route)
        if rng is None:
            rng = self._rngs[route] = random.Random(f"{self.settings.seed}/{route}")
        u, v, w = rng.random(), rng.random(), rng.random()
        plan = self._plan(route)
        if not plan.thresholds and not plan.latency_s and not plan.jitter_s:
            return NO_FAULT
        kind = None
        for threshold, k in plan.thresholds:
            if u < threshold:
                kind = k
                break
        return Fault(kind, plan.latency_s + v * plan.jitter_s, w)
