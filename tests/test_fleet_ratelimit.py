"""The fleet-wide rate limiter end to end: a real redis-server, real worker processes (two, eight
threads each) and the sandbox's Kong-style per-workspace limits (fixed wall-clock windows).

Small limits keep it quick: every workspace is 120/min and 10/s at the sandbox and in the
workers' configuration (`default` through AWORK_RATE_LIMIT_*, the others through their TOML
tables); with the 0.97 margin the fleet uses 116/min and 9/s.

One ~70 s scenario runs three workspaces at once, and three tests read its outcome:

- `default` (A): a steady run past its minute budget (75 uploads = 150 requests): no 429, the
  first minute used to ~100%, waiting jobs say so in their records, everything finishes.
- `second` (B): enqueued while A is stopped by its minute window, behind A's deferred jobs:
  it finishes at its own full speed while A is still waiting.
- `third` (C): another client of the workspace (a thread here, with C's API key) uses a third
  of the minute budget just before the fleet starts on C, then keeps sending a little; the
  fleet learns it from awork's x-ratelimit-remaining-* headers and slows down, so that neither
  gets (almost) any 429. (Learning sees usage that already happened: a client that keeps
  sending more than the margin leaves free after the fleet has used the rest of a minute still
  meets 429s until that minute ends; the limiter's docstring says so.)

Then a forced 429 storm: the workspace pauses for the whole fleet, `awork-uploads workspaces`
and the job records show it, the fleet resumes by itself, and the many waits do not use up
the jobs' error budget (AWORK_MAX_ATTEMPTS=3 here). Last, a deep backlog in one workspace
while it is still pacing (short waits, slept in worker threads) must not take every thread
from another workspace.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import requests

from producers.records import Job
from producers.spec import JobSpec
from tests.fleet import Fleet, wait_until
from workers.limits_config import WorkspaceLimits
from workers.ratelimit import RateLimiter

pytestmark = [pytest.mark.slow, pytest.mark.timing]

PER_MINUTE, PER_SECOND = 120, 10
LIMITS = WorkspaceLimits(PER_MINUTE, PER_SECOND)  # 116/min, 9/s effective
THIRD_KEY = "third-key-" + secrets.token_hex(8)
MAX_ATTEMPTS = 3
API_ROUTES = ("generate", "link", "image_link", "multipart", "list")

A, B, C = "default", "second", "third"
A_JOBS, B_JOBS, C_JOBS = 75, 30, 60
OUTSIDE_BURST = 40  # requests the other client sends just before the fleet starts on C
OUTSIDE_EVERY = 20.0  # then one every 20 s: 3/min, within the 4/min the margin leaves free


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("rl-fleet")
    workspaces = root / "rl-workspaces.toml"
    # `default` takes its limits from AWORK_RATE_LIMIT_* (the env path), the others
    # from their tables.
    workspaces.write_text(
        '[workspaces.default]\napi_key_env = "AWORK_API_KEY"\n\n'
        f'[workspaces.second]\napi_key_env = "SECOND_AWORK_KEY"\nper_minute = {PER_MINUTE}\n'
        f"per_second = {PER_SECOND}\n\n"
        f'[workspaces.third]\napi_key_env = "THIRD_AWORK_KEY"\nper_minute = {PER_MINUTE}\n'
        f"per_second = {PER_SECOND}\n"
    )
    f = Fleet(
        root,
        worker_count=2,
        concurrency=8,
        extra_env={
            "AWORK_WORKSPACES_FILE": str(workspaces),
            "THIRD_AWORK_KEY": THIRD_KEY,
            "AWORK_RATE_LIMIT_PER_MINUTE": str(PER_MINUTE),
            "AWORK_RATE_LIMIT_PER_SECOND": str(PER_SECOND),
            "AWORK_MAX_ATTEMPTS": str(MAX_ATTEMPTS),
        },
        sandbox_args=[
            *("--api-key", f"{THIRD_KEY}={C}"),
            *("--rate-limit-per-minute", str(PER_MINUTE)),
            *("--rate-limit-per-second", str(PER_SECOND)),
        ],
    )
    try:
        f.start()
        yield f
    finally:
        f.stop()


# -- helpers ------------------------------------------------------------------------------------
def enqueue(fleet: Fleet, workspace: str, entity: str, n: int, tag: str) -> list[Job]:
    specs = [
        JobSpec(f"{tag}-{i}-".encode() * 40, to=f"task:{entity}", workspace=workspace, name=f"{tag}-{i}.txt")
        for i in range(n)
    ]
    return fleet.uploads.enqueue_many(specs)


def unfinished(fleet: Fleet, jobs: list[Job]) -> int:
    return sum(not j.finished for j in fleet.uploads.statuses([j.id for j in jobs]))


def count_429(fleet: Fleet) -> int:
    """Every 429 the sandbox answered (injected ones are not in `rate_limited`)."""
    return int(fleet.sandbox.stats()["statuses"].get("429", 0))


def fresh_windows(fleet: Fleet) -> None:
    """Forget the sandbox's windows and counters and the limiter's logs (jobs must be done)."""
    fleet.sandbox.reset()
    r = fleet.client()
    for key in r.scan_iter("awork:rl:*"):
        r.delete(key)


def cli(fleet: Fleet, *args: str) -> subprocess.CompletedProcess[str]:
    keep = ("REDIS_URL", "STAGING_DIR", "AWORK_WORKSPACES_FILE", "AWORK_RATE_LIMIT_PER_MINUTE",
            "AWORK_RATE_LIMIT_PER_SECOND")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWORK_")}
    env.update({k: fleet.env[k] for k in keep})
    return subprocess.run(
        [sys.executable, "-m", "ops.cli", *args], env=env, capture_output=True, text=True, timeout=30
    )


@dataclass
class Sample:
    t: float
    requests: dict[str, int]
    rate_limited: dict[str, int]


class Sampler(threading.Thread):
    """The sandbox's per-workspace counters over time (what awork's gateway saw)."""

    def __init__(self, fleet: Fleet, interval: float = 0.25) -> None:
        super().__init__(daemon=True, name="sampler")
        self.fleet = fleet
        self.interval = interval
        self.samples: list[Sample] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            s = self.fleet.sandbox.stats()
            self.samples.append(
                Sample(time.time(), dict(s["requests_by_workspace"]), dict(s["rate_limited_by_workspace"]))
            )
            self.stop_event.wait(self.interval)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(10)

    def accepted(self, ws: str, at: float) -> int:
        """Requests of `ws` the sandbox accepted (not 429) by time `at` (last sample before it)."""
        best = 0
        for s in self.samples:
            if s.t > at:
                break
            best = s.requests.get(ws, 0) - s.rate_limited.get(ws, 0)
        return best

    def first_time(self, ws: str, count: int) -> float | None:
        """When `ws` had at least `count` accepted requests."""
        for s in self.samples:
            if s.requests.get(ws, 0) - s.rate_limited.get(ws, 0) >= count:
                return s.t
        return None


class OutsideClient(threading.Thread):
    """Another integration of workspace C: its own requests with C's key, straight to the sandbox."""

    def __init__(self, api_url: str, entity: str, burst: int, every: float) -> None:
        super().__init__(daemon=True, name="outside-client")
        self.api_url = api_url
        self.entity = entity
        self.burst = burst
        self.every = every
        self.statuses: list[int] = []
        self.burst_done = threading.Event()
        self.stop_event = threading.Event()

    def _one(self, http: requests.Session) -> None:
        r = http.get(f"{self.api_url}/tasks/{self.entity}/files", timeout=10)
        self.statuses.append(r.status_code)

    def run(self) -> None:
        http = requests.Session()
        http.trust_env = False
        http.headers["Authorization"] = f"Bearer {THIRD_KEY}"
        for _ in range(self.burst):  # 8/s: under the per-second limit on its own
            self._one(http)
            time.sleep(0.125)
        self.burst_done.set()
        while not self.stop_event.wait(self.every):
            self._one(http)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(15)


@dataclass
class Outcome:
    t0: float
    a: list[Job]
    b: list[Job]
    c: list[Job]
    a_done_at: float
    b_enqueued_at: float
    b_done_at: float
    c_enqueued_at: float
    c_done_at: float
    a_unfinished_when_b_done: int
    a_waiting: list[Job]
    c_outside_seen: int
    outside: list[int]
    sampler: Sampler
    stats: dict[str, Any]
    records: dict[str, dict[str, str]]


@pytest.fixture(scope="module")
def scenario(fleet: Fleet) -> Outcome:
    entities = {ws: fleet.sandbox.seed("tasks", workspace=ws) for ws in (A, B, C)}
    limiter = RateLimiter(fleet.client())
    sampler = Sampler(fleet)
    sampler.start()
    outside = OutsideClient(fleet.sandbox.api_url, entities[C], OUTSIDE_BURST, OUTSIDE_EVERY)
    # The other client's burst and the fleet's first C requests must fall in the same wall-clock
    # minute (awork's window) for the fleet to see the burst in x-ratelimit-remaining-minute.
    into = time.time() % 60
    if into > 35:
        time.sleep(60.2 - into)
    try:
        t0 = time.time()
        outside.start()
        a = enqueue(fleet, A, entities[A], A_JOBS, "a")
        assert outside.burst_done.wait(30)
        c_enqueued_at = time.time()
        c = enqueue(fleet, C, entities[C], C_JOBS, "c")

        # A is throttled once its minute budget is gone: its jobs wait with a countdown.
        a_waiting: list[Job] = []

        def a_throttled() -> bool:
            if limiter.snapshot(A, LIMITS)["used_last_minute"] < LIMITS.effective_per_minute:
                return False
            now = time.time()
            waiting = [
                j
                for j in fleet.uploads.statuses([j.id for j in a])
                if j.wait_reason and j.wait_until and j.wait_until > now + 5
            ]
            a_waiting[:] = waiting
            return len(waiting) >= 5

        wait_until(a_throttled, timeout=40)
        c_outside_seen = limiter.snapshot(C, LIMITS)["outside_last_minute"]

        b_enqueued_at = time.time()
        b = enqueue(fleet, B, entities[B], B_JOBS, "b")
        fleet.wait(b, timeout=40)
        b_done_at = time.time()
        a_unfinished_when_b_done = unfinished(fleet, a)
        c_outside_seen = max(c_outside_seen, limiter.snapshot(C, LIMITS)["outside_last_minute"])

        done_at: dict[str, float] = {}
        deadline = time.monotonic() + 100
        while len(done_at) < 2 and time.monotonic() < deadline:
            for name, jobs in (("a", a), ("c", c)):
                if name not in done_at and unfinished(fleet, jobs) == 0:
                    done_at[name] = time.time()
            time.sleep(0.25)
        assert len(done_at) == 2, f"not finished in time: A {unfinished(fleet, a)}, C {unfinished(fleet, c)}"
    finally:
        outside.stop()
        sampler.stop()
    jobs = [*a, *b, *c]
    final = fleet.uploads.statuses([j.id for j in jobs])
    stats = fleet.sandbox.stats()
    print(
        f"\nscenario: A done at +{done_at['a'] - t0:.1f} s, B took {b_done_at - b_enqueued_at:.1f} s "
        f"(A unfinished then: {a_unfinished_when_b_done}), C took {done_at['c'] - c_enqueued_at:.1f} s; "
        f"C outside learned: {c_outside_seen}; requests {stats['requests_by_workspace']}, "
        f"429s {stats['rate_limited_by_workspace']}, outside client {len(outside.statuses)} "
        f"({outside.statuses.count(429)} x 429)"
    )
    n_a, n_b = len(a), len(b)
    return Outcome(
        t0=t0,
        a=final[:n_a],
        b=final[n_a : n_a + n_b],
        c=final[n_a + n_b :],
        a_done_at=done_at["a"],
        b_enqueued_at=b_enqueued_at,
        b_done_at=b_done_at,
        c_enqueued_at=c_enqueued_at,
        c_done_at=done_at["c"],
        a_unfinished_when_b_done=a_unfinished_when_b_done,
        a_waiting=a_waiting,
        c_outside_seen=c_outside_seen,
        outside=list(outside.statuses),
        sampler=sampler,
        stats=stats,
        records={j.id: fleet.record(j.id) for j in jobs},
    )


# -- the scenario's three cases -----------------------------------------------------------------
def test_steady_run_at_the_limit_gets_no_429(scenario: Outcome) -> None:
    s = scenario
    assert all(j.state.value == "done" for j in s.a), [j.error for j in s.a if j.state.value != "done"]
    assert s.stats["rate_limited_by_workspace"].get(A, 0) == 0
    # Two requests per upload, each counted once by the gateway.
    assert s.stats["requests_by_workspace"][A] == 2 * A_JOBS
    # The minute budget is used, not wasted: the first 116 requests go within ~15 s (9/s),
    # and no 60 s interval holds more than awork's 120.
    first = s.sampler.first_time(A, 1)
    assert first is not None
    full = s.sampler.first_time(A, LIMITS.effective_per_minute)
    assert full is not None and full - first < 25, full - first if full else None
    assert s.sampler.accepted(A, first + 58) <= PER_MINUTE
    # The rest had to wait for the window, and said so in their records.
    assert s.a_waiting, "no A job was seen waiting"
    for job in s.a_waiting:
        assert job.wait_reason in ("rate_limit", "rate_limit_429"), job.wait_reason
    assert s.a_done_at - first >= 55  # 150 requests cannot fit in one minute of 116
    for job in s.a:
        record = s.records[job.id]
        assert not any(k.startswith("errors_") for k in record), record
        assert "wait_reason" not in record and "wait_until" not in record, record


def test_a_throttled_workspace_does_not_hold_back_another(scenario: Outcome) -> None:
    s = scenario
    assert all(j.state.value == "done" for j in s.b)
    assert s.stats["rate_limited_by_workspace"].get(B, 0) == 0
    took = s.b_done_at - s.b_enqueued_at
    # 60 requests at 9/s take ~6.7 s; allow for the chain's hops on a small machine.
    assert took < 2 * B_JOBS / LIMITS.effective_per_second * 1.6 + 3, took
    # ...while A, enqueued first and sitting ahead of B in the queues, was still waiting.
    assert s.a_unfinished_when_b_done >= 5, s.a_unfinished_when_b_done


def test_budget_partly_used_by_another_client_slows_the_fleet_down(scenario: Outcome) -> None:
    s = scenario
    assert all(j.state.value == "done" for j in s.c)
    # The fleet learned the other client's burst from awork's x-ratelimit-remaining-minute
    # (a lower bound: requests of ours still in flight hide a few of theirs).
    assert s.c_outside_seen >= OUTSIDE_BURST - 8, s.c_outside_seen
    theirs = len(s.outside)
    fleet_requests = s.stats["requests_by_workspace"][C] - theirs
    # Without learning, the fleet would send ~116 requests on top of the other client's 40 in
    # the same minute: ~36 x 429. With it: (almost) none, for the fleet and the other client.
    assert s.stats["rate_limited_by_workspace"].get(C, 0) <= 2, (s.stats, s.outside)
    assert fleet_requests <= 2 * C_JOBS + 2
    # It slowed down to make room: its 120 requests needed a second window.
    assert s.c_done_at - s.c_enqueued_at > 55, s.c_done_at - s.c_enqueued_at


# -- 429 storm ----------------------------------------------------------------------------------
def test_429_storm_pauses_the_workspace_then_recovers_without_using_retries(
    fleet: Fleet, scenario: Outcome
) -> None:
    fresh_windows(fleet)  # the scenario's jobs are all done
    entity = fleet.sandbox.seed("tasks", workspace=A)
    storm_s = 8.0
    fleet.sandbox.set_faults({"routes": {route: {"429": 1.0} for route in API_ROUTES}})
    try:
        started = time.time()
        jobs = enqueue(fleet, A, entity, 20, "storm")
        wait_until(lambda: count_429(fleet) >= 2, timeout=15)

        # Visible while it lasts: the workspace's pause, and the jobs' records.
        for _ in range(3):  # each pause lasts 1 s (ratelimit-reset), with a gap of ms between two
            out = cli(fleet, "workspaces", "--json", A)
            assert out.returncode == 0, out.stderr
            row = json.loads(out.stdout.strip().splitlines()[0])
            if row["paused"]:
                break
        assert row["workspace"] == A and row["effective_per_minute"] == LIMITS.effective_per_minute
        assert row["paused"] and row["pause_reason"].startswith("429"), row

        def some_job_waits() -> bool:
            now = time.time()
            return any(
                j.wait_reason in ("rate_limit", "rate_limit_429") and (j.wait_until or 0) > now
                for j in fleet.uploads.statuses([j.id for j in jobs])
            )

        wait_until(some_job_waits, timeout=5, interval=0.05)
        # All of them at once: a single job may be between two waits when the CLI reads it.
        status = cli(fleet, "status", "--json", *(j.id for j in jobs))
        assert status.returncode == 0, status.stderr
        shown = [json.loads(line) for line in status.stdout.strip().splitlines()]
        shown_waiting = [j for j in shown if j["wait_reason"] in ("rate_limit", "rate_limit_429")]
        assert any(j["wait_until"] for j in shown_waiting), shown

        time.sleep(max(0.0, started + storm_s - time.time()))
    finally:
        fleet.sandbox.set_faults({"routes": {route: {"429": 0} for route in API_ROUTES}})
    storm_429 = count_429(fleet)
    ended = time.time()
    final = fleet.wait(jobs, timeout=30)
    recovered_in = time.time() - ended

    assert all(j.state.value == "done" for j in final), [j.error for j in final]
    # The fleet paused the workspace instead of hammering it: about one probe per reset
    # (1 s) with a few in flight, where 20 jobs retrying on their own would send ~150.
    assert storm_429 <= 3 * storm_s, storm_429
    assert recovered_in < 15, recovered_in  # 40 requests at 9/s, once the storm is over
    assert count_429(fleet) == storm_429  # none after it
    # Waiting is not failing: jobs waited more often than their error budget allows
    # (AWORK_MAX_ATTEMPTS=3), yet none used an error retry.
    records = [fleet.record(j.id) for j in final]
    waits = [int(rec.get("rate_limited") or 0) + int(rec.get("rate_waits") or 0) for rec in records]
    print(f"\nstorm: {storm_429} x 429 in {storm_s:.0f} s, recovered in {recovered_in:.1f} s, waits {waits}")
    assert max(waits) >= MAX_ATTEMPTS, waits
    for rec in records:
        assert not any(k.startswith("errors_") for k in rec), rec
        assert not rec.get("error_code"), rec


# -- a backlog that paces must not take every thread --------------------------------------------
def test_a_backlog_in_one_workspace_leaves_threads_for_another(fleet: Fleet, scenario: Outcome) -> None:
    """Runs last: it leaves A's backlog to the fleet's teardown."""
    fresh_windows(fleet)
    ea = fleet.sandbox.seed("tasks", workspace=A)
    eb = fleet.sandbox.seed("tasks", workspace=B)
    enqueue(fleet, A, ea, 150, "deep")  # 300 requests: A paces at 9/s for its first 116
    started = time.time()
    b = enqueue(fleet, B, eb, 15, "beside")
    final = fleet.wait(b, timeout=60)
    took = time.time() - started
    a_used = RateLimiter(fleet.client()).snapshot(A, LIMITS)["used_last_minute"]
    print(f"\nbacklog: B's 30 requests took {took:.1f} s beside A's backlog (A used {a_used})")
    assert all(j.state.value == "done" for j in final)
    # 30 requests at 9/s take ~3.3 s. When A's jobs could sleep for tokens in every thread, B
    # waited behind them: ~25 s for 40 requests.
    assert took < 10, took
    assert a_used < LIMITS.effective_per_minute  # A was still pacing, not stopped by its minute
