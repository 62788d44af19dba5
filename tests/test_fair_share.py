"""The fair-share scheduler (workers/fair_share.lua) against a real redis-server: shares, weights,
waiting lists, priority with aging, dispatch on release, and slots of dead workers."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest
import redis

from ops.redis_server import command_calls
from producers.priority import Priority
from workers.fair_share import FairSettings, FairShare, WorkspaceShare

NOW = 1_000_000.0
MIB = 1024 * 1024


@pytest.fixture
def fair(redis_url: str) -> Iterator[FairShare]:
    client = redis.Redis.from_url(redis_url)
    f = FairShare(client, lease_seconds=60, settings=FairSettings(aging_seconds=300))
    f.register("w1", 4, now=NOW)
    yield f
    client.close()


def admit(
    f: FairShare, ws: str, job: str, *, weight: float = 1, prio: Priority = Priority.NORMAL, at: float = NOW
) -> bool:
    return f.admit(ws, job, weight, MIB, prio, now=at).granted


def shares(f: FairShare, at: float = NOW) -> dict[str, WorkspaceShare]:
    return {s.workspace: s for s in f.snapshot(now=at)}


def test_a_workspace_alone_gets_every_slot_and_waits_beyond(fair: FairShare) -> None:
    assert all(admit(fair, "a", f"a{i}") for i in range(4))
    assert not admit(fair, "a", "a4")
    s = shares(fair)["a"]
    assert (s.in_flight, s.waiting, s.slots, s.capacity) == (4, 1, 4, 4)


def test_a_second_workspace_is_admitted_past_a_full_fleet_and_a_waits(fair: FairShare) -> None:
    for i in range(4):
        assert admit(fair, "a", f"a{i}")
    # b's transfer arrives while a holds every slot: b is under its share (2 of 4) and starts
    assert admit(fair, "b", "b0")
    # a is over its share now: its next transfers wait
    assert not admit(fair, "a", "a4")
    assert not admit(fair, "a", "a5")
    assert admit(fair, "b", "b1")  # b under its share: starts too (6 leases on 4 slots for now)
    assert not admit(fair, "b", "b2")  # b at its share
    # the fleet is over-full: slots given back go to nobody until it is not
    assert fair.release("a", "a0", now=NOW + 1) == []
    assert fair.release("a", "a1", now=NOW + 1) == []
    # a below its share (1 of 2): its best waiting job gets the slot
    assert fair.release("a", "a2", now=NOW + 1) == [("a", "a4")]
    # b below its share: b's waiting job, not a's older one
    assert fair.release("b", "b0", now=NOW + 2) == [("b", "b2")]
    # a spare slot with only a waiting: it never stays idle while a job waits
    assert fair.release("b", "b1", now=NOW + 3) == [("a", "a5")]


def test_announced_demand_makes_a_heavy_workspace_wait(fair: FairShare) -> None:
    for i in range(4):
        assert admit(fair, "a", f"a{i}")
    fair.expect("b", "b0", 1, now=NOW)
    fair.release("a", "a0", now=NOW + 1)
    # a slot is free, but b (under its share) has a transfer on its way: a's next one waits
    assert not admit(fair, "a", "a4", at=NOW + 1)
    assert admit(fair, "b", "b0", at=NOW + 1)


def test_slots_are_dispatched_by_weighted_virtual_time(fair: FairShare) -> None:
    fair.register("w1", 2, now=NOW)
    got: Counter[str] = Counter()
    weights = {"a": 1.0, "b": 1.0, "c": 2.0}
    for ws, w in weights.items():
        for i in range(100):  # every workspace keeps a backlog through the run
            admitted = fair.admit(ws, f"{ws}{i}", w, MIB, Priority.NORMAL, now=NOW).granted
            if admitted:
                got[ws] += 1
    running = [(ws, job) for ws in weights for job in _leases(fair, ws)]
    t = NOW
    for _ in range(120):
        t += 1
        ws, job = running.pop(0)
        for nxt in fair.release(ws, job, now=t):
            got[nxt[0]] += 1
            running.append(nxt)
    total = sum(got.values())
    assert got["c"] / total == pytest.approx(0.5, abs=0.05)
    assert got["a"] / total == pytest.approx(0.25, abs=0.05)
    assert got["b"] / total == pytest.approx(0.25, abs=0.05)


def test_priority_orders_a_workspace_and_bulk_ages(redis_url: str) -> None:
    fair = FairShare(
        redis.Redis.from_url(redis_url), lease_seconds=60, settings=FairSettings(aging_seconds=20)
    )
    fair.register("w1", 4, now=NOW)
    for i in range(4):
        assert admit(fair, "a", f"a{i}")
    assert not admit(fair, "a", "bulk-old", prio=Priority.BULK, at=NOW)  # rank NOW + 20
    assert not admit(fair, "a", "normal", prio=Priority.NORMAL, at=NOW + 1)  # NOW + 3
    assert not admit(fair, "a", "high", prio=Priority.HIGH, at=NOW + 2)  # NOW + 2
    # more than the bulk offset after bulk-old arrived: a high job comes in behind it
    assert not admit(fair, "a", "high-late", prio=Priority.HIGH, at=NOW + 25)
    order = [fair.release("a", f"a{i}", now=NOW + 26)[0][1] for i in range(4)]
    assert order == ["high", "normal", "bulk-old", "high-late"]


def test_a_dead_workers_lease_lapses_when_its_step_lock_is_gone(fair: FairShare, redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    for i in range(4):
        assert admit(fair, "a", f"a{i}")
    client.set("awork:job:a0:lock:put", "token")  # a0's step is alive (its heartbeat keeps the lock)
    assert not admit(fair, "a", "a4")
    # after the lease time, a1..a3 have no lock: their slots come back, a0 keeps its own
    later = NOW + 61
    fair.register("w1", 4, now=later)  # the live worker renews its registration
    s = shares(fair, later)["a"]
    assert s.in_flight == 1
    assert fair.dispatch(now=later) == [("a", "a4")]
    client.close()


def test_capacity_follows_live_workers(fair: FairShare) -> None:
    fair.register("w2", 4, now=NOW)
    for i in range(8):
        assert admit(fair, "a", f"a{i}")
    assert not admit(fair, "a", "a8")
    # w2 stops renewing: after its registration lapses, a's share is 4 again
    fair.register("w1", 4, now=NOW + 30)
    assert shares(fair, NOW + 40)["a"].capacity == 4


def test_a_redelivered_waiting_job_keeps_its_place(fair: FairShare) -> None:
    for i in range(4):
        assert admit(fair, "a", f"a{i}")
    assert not admit(fair, "a", "first", at=NOW)
    assert not admit(fair, "a", "second", at=NOW + 1)
    assert not admit(fair, "a", "first", at=NOW + 2)  # the sweeper re-drove it
    assert fair.release("a", "a0", now=NOW + 3) == [("a", "first")]
    # the dispatched job's message arrives: it holds a reserved slot and starts
    assert admit(fair, "a", "first", at=NOW + 3)


def _leases(fair: FairShare, ws: str) -> list[str]:
    raw = fair.redis.zrange(f"awork:fair:lease:{ws}", 0, -1)
    return [r.decode() for r in raw]  # type: ignore[union-attr]


def test_drain_takes_every_waiting_job_when_the_fair_share_is_off(fair: FairShare) -> None:
    for i in range(4):
        assert admit(fair, "a", f"a{i}")
    for job in ("x", "y"):
        assert not admit(fair, "a", job)
    assert admit(fair, "b", "b0") and admit(fair, "b", "b1")
    assert not admit(fair, "b", "z")
    assert sorted(fair.drain()) == [("a", "x"), ("a", "y"), ("b", "z")]
    assert fair.drain() == []


def test_the_sweeper_leaves_a_job_waiting_for_a_slot_alone(redis_url: str) -> None:
    from producers.keys import ACTIVE_KEY, job_key
    from workers.fair_gate import WAIT_REASON
    from workers.sweeper import Sweeper
    from workers.sweeper_rules import SweeperTimings

    client = redis.Redis.from_url(redis_url)
    job = "0" * 31 + "1"
    old = NOW - 10 * SweeperTimings().idle
    record = {
        "id": job,
        "state": "requesting_url",
        "workspace": "a",
        "target": "task:3f0c1d2e-0000-4000-8000-000000000000",
        "file_name": "f.bin",
        "published": "1",
        "upload_id": "u1",
        "upload_url": "http://127.0.0.1:1/u1",
        "wait_reason": WAIT_REASON,
        "created_at": repr(old),
        "updated_at": repr(old),
    }
    client.hset(job_key(job), mapping=record)
    client.zadd(ACTIVE_KEY, {job: old})
    client.zadd("awork:fair:wait:a", {job: old})
    sweeper = Sweeper(client, redis_url)
    try:
        assert sweeper.sweep_once(now=NOW).redriven == 0  # it waits for its turn on purpose
        client.zrem("awork:fair:wait:a", job)  # off the list and no message anywhere: lost
        assert sweeper.sweep_once(now=NOW).redriven == 1
    finally:
        sweeper.app.close()
        client.close()


def test_a_metrics_scrape_renews_a_lease_by_the_step_lock_ttl(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scrape's snapshot renews a lease whose step lock lives; by more than the lock's TTL,
    a worker killed right after would keep its slot from the others for that much longer."""
    import time

    from producers.keys import step_lock_key
    from workers import fair_metrics

    monkeypatch.setenv("AWORK_LOCK_TTL_SECONDS", "4")
    client = redis.Redis.from_url(redis_url)
    fair = FairShare(client, lease_seconds=4)
    then = time.time() - 10
    fair.register("w1", 2, now=then)
    assert fair.admit("a", "j1", 1, MIB, Priority.NORMAL, now=then).granted  # its lease has lapsed
    client.set(step_lock_key("j1", "put"), "a worker", ex=60)  # but its step still runs
    collector = fair_metrics.FairShareCollector(redis_url)
    assert [m.name for m in collector.collect()][:2] == [
        "awork_uploads_fair_waiting",
        "awork_uploads_fair_in_flight",
    ]
    expiry = client.zscore("awork:fair:lease:a", "j1")
    assert expiry is not None and expiry <= time.time() + 4
    client.close()


def _commands(client: redis.Redis) -> int:
    """Redis commands run so far, those inside scripts included (INFO commandstats)."""
    outside = {"evalsha", "eval", "info", "config|resetstat"}
    return sum(n for name, n in command_calls(client).items() if name not in outside)


def test_a_busy_workspace_costs_few_redis_commands_a_transfer(redis_url: str) -> None:
    """The hot path (expect, admit, release for every transfer) of one busy workspace: at most
    4 commands a call on average, expiry scans and the capacity's recount every few seconds
    included (the script before the book ran ~10.7: three ZCARDs, two expiry scans, the
    workers' and slots' reads and HGETs per active workspace on every admit and release)."""
    client = redis.Redis.from_url(redis_url)
    fair = FairShare(client, lease_seconds=5)
    t = NOW
    fair.register("w1", 8, now=t)
    running: list[str] = []
    jobs, per_call = 400, 4.0

    def one(i: int) -> None:
        nonlocal t
        t += 0.05  # 20 s in all: `due` passes every lease time (5 s), the worker renews every 10 s
        if i % 200 == 0:
            fair.register("w1", 8, now=t)
        job = f"j{i}"
        fair.expect("a", job, 1, now=t)
        assert fair.admit("a", job, 1, MIB, Priority.NORMAL, now=t).granted
        running.append(job)
        if len(running) > 4:  # a few transfers in flight all along
            assert fair.release("a", running.pop(0), now=t) == []

    for i in range(20):
        one(i)
    client.config_resetstat()
    before = _commands(client)
    for i in range(20, 20 + jobs):
        one(i)
    used = _commands(client) - before
    assert used / (3 * jobs) <= per_call, f"{used / (3 * jobs):.2f} commands a call"
    assert shares(fair, t)["a"].in_flight == len(running)
    client.close()
