"""Step locks against a real Redis: a holder frozen past its lock is fenced off before it acts,
and its late release leaves the new holder's lock and `running` mark alone."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from ops.redis_server import command_calls
from producers.keys import job_key
from workers.step_lock import LeaseLost, LockTimings, StepLocks, lock_key


def _frozen(locks: StepLocks, token: str) -> None:
    """As after a SIGSTOP: the lock was last known ours longer ago than half its TTL."""
    locks._held[token].renewed -= locks.timings.ttl  # the clock is what a freeze moves


def test_a_fresh_lock_passes_the_fence_without_asking_redis(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    locks = StepLocks(client)
    token, _ = locks.acquire_and_read("j1", "link")
    assert token is not None
    client.set(lock_key("j1", "link"), "someone else")  # cannot happen within a live lease
    locks.fence("j1", "link", token)  # trusted: renewed moments ago, no round trip
    locks.release("j1", "link", token)


def test_a_frozen_holder_keeps_a_lock_still_its_own_and_renews_it(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    locks = StepLocks(client)
    token, _ = locks.acquire_and_read("j2", "put")
    assert token is not None
    client.expire(lock_key("j2", "put"), 1)
    _frozen(locks, token)
    locks.fence("j2", "put", token)  # asked Redis: still ours, and extended
    assert client.ttl(lock_key("j2", "put")) > 1
    locks.fence("j2", "put", token)
    locks.release("j2", "put", token)
    assert client.get(lock_key("j2", "put")) is None


@pytest.mark.parametrize("taken_over", [True, False])
def test_a_frozen_holder_whose_lock_lapsed_is_fenced_off(redis_url: str, taken_over: bool) -> None:
    client = redis.Redis.from_url(redis_url)
    client.hset(job_key("j3"), mapping={"id": "j3", "running": "link"})
    locks = StepLocks(client)
    token, _ = locks.acquire_and_read("j3", "link")
    assert token is not None
    client.delete(lock_key("j3", "link"))  # lapsed while frozen ...
    if taken_over:  # ... and another worker runs the step now
        client.set(lock_key("j3", "link"), "their-token", ex=60)
    _frozen(locks, token)
    with pytest.raises(LeaseLost):
        locks.fence("j3", "link", token)
    with pytest.raises(LeaseLost):  # and it stays lost
        locks.fence("j3", "link", token)
    locks.release("j3", "link", token)
    if taken_over:  # the late release leaves the new holder's lock and mark alone
        assert client.get(lock_key("j3", "link")) == b"their-token"
        assert client.hget(job_key("j3"), "running") == b"link"
    else:
        assert client.hget(job_key("j3"), "running") is None


@pytest.mark.slow
def test_a_release_that_fails_while_redis_is_away_is_retried_once_it_is_back(tmp_path: object) -> None:
    from pathlib import Path

    from ops.redis_server import RedisServer

    server = RedisServer(Path(str(tmp_path)) / "redis", appendfsync="always").start()
    try:
        client = redis.Redis.from_url(server.url)
        locks = StepLocks(client)
        token, _ = locks.acquire_and_read("j4", "put")
        assert token is not None
        server.kill()
        locks.release("j4", "put", token)  # fails: Redis is away (the lock would live its TTL)
        server.start()  # same AOF: the lock is still there
        assert client.get(lock_key("j4", "put")) == token.encode()
        deadline = time.monotonic() + 5  # retried every second; the TTL is 60 s
        while client.get(lock_key("j4", "put")) is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert client.get(lock_key("j4", "put")) is None, "released once Redis answered again"
        client.close()
    finally:
        server.stop()


def test_a_lock_taken_as_the_connection_broke_is_released_not_left_for_its_ttl(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    locks = StepLocks(client)
    real_pipeline = client.pipeline
    taken: list[str] = []

    class BreaksAfterSet:
        """The SET reaches Redis, then the connection breaks before the answer."""

        def __init__(self) -> None:
            self.pipe = real_pipeline(transaction=False)

        def set(self, key: str, value: str, **kw: object) -> None:
            client.set(key, value, **kw)  # type: ignore[arg-type]
            taken.append(value)

        def get(self, key: str) -> None:
            pass

        def hgetall(self, key: str) -> None:
            pass

        def execute(self) -> None:
            raise redis.exceptions.ConnectionError("Connection closed by server.")

    client.pipeline = lambda transaction=True: BreaksAfterSet()  # type: ignore[method-assign,assignment]
    with pytest.raises(redis.exceptions.ConnectionError):
        locks.acquire_and_read("j5", "generate")
    client.pipeline = real_pipeline  # type: ignore[method-assign]
    assert taken, "the SET reached Redis"
    # released before the error reaches the step (which requeues it), not left for its TTL
    assert client.get(lock_key("j5", "generate")) is None
    client.close()


def test_a_lock_taken_by_a_first_send_whose_answer_was_lost_is_ours(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """redis-py sends a pipeline again when the connection broke before the answer: the first
    SET NX took the lock, the second finds it taken. The lock is still ours."""
    import uuid

    from workers import step_lock

    client = redis.Redis.from_url(redis_url)
    fixed = uuid.uuid4()
    monkeypatch.setattr(step_lock.uuid, "uuid4", lambda: fixed)
    client.set(lock_key("j6", "generate"), fixed.hex, ex=60)  # what the first send did
    locks = StepLocks(client)
    token, _ = locks.acquire_and_read("j6", "generate")
    assert token == fixed.hex
    client.set(lock_key("j7", "generate"), "another worker", ex=60)
    assert locks.acquire_and_read("j7", "generate")[0] is None
    locks.release("j6", "generate", token)
    assert client.get(lock_key("j6", "generate")) is None
    client.close()


def _calls(client: redis.Redis, command: str) -> int:
    return command_calls(client)[command]


def test_the_heartbeat_renews_only_locks_a_heartbeat_old(redis_url: str) -> None:
    """One timer per process, and a lock younger than a heartbeat costs no Redis call: short
    steps (most of them) are never renewed, a long one is, once a heartbeat, well within its TTL."""
    client = redis.Redis.from_url(redis_url)
    locks = StepLocks(client, LockTimings(ttl=6, heartbeat=1.0))
    old, _ = locks.acquire_and_read("j10", "put")
    time.sleep(0.6)
    young, _ = locks.acquire_and_read("j11", "put")
    assert old is not None and young is not None
    assert threading.active_count() >= 2 and locks._thread is not None
    scripts = _calls(client, "evalsha")
    time.sleep(0.7)  # the first lock is now a heartbeat old, the second is not
    assert _calls(client, "evalsha") - scripts == 1
    assert client.hget(job_key("j10"), "heartbeat_at") is not None
    assert client.hget(job_key("j11"), "heartbeat_at") is None
    assert client.ttl(lock_key("j10", "put")) > 5
    time.sleep(0.6)  # and then the second one
    assert client.hget(job_key("j11"), "heartbeat_at") is not None
    locks.release("j10", "put", old)
    locks.release("j11", "put", young)
    threads = {t.name for t in threading.enumerate()}
    assert sum(name == "awork-heartbeat" for name in threads) <= 1


def test_an_idle_heartbeat_makes_no_redis_call(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    locks = StepLocks(client, LockTimings(ttl=3, heartbeat=0.2))
    for n in range(20):  # steps shorter than a heartbeat, one after another
        token, _ = locks.acquire_and_read(f"j2{n}", "link")
        assert token is not None
        locks.release(f"j2{n}", "link", token)
    before = _calls(client, "evalsha")
    time.sleep(1.0)  # five heartbeats with nothing held
    assert _calls(client, "evalsha") == before
    assert locks.beat_once(time.monotonic()) == 0


def _holding(
    redis_url: str, job_id: str, step: str, record: dict[str, str]
) -> tuple[redis.Redis, StepLocks, str]:
    """A job record and this process holding its step's lock."""
    client = redis.Redis.from_url(redis_url)
    client.hset(job_key(job_id), mapping=record)
    locks = StepLocks(client)
    token, _ = locks.acquire_and_read(job_id, step)
    assert token is not None
    return client, locks, token


def test_the_last_write_and_the_release_go_in_one_round_trip(redis_url: str) -> None:
    client, locks, token = _holding(redis_url, "j7", "put", {"id": "j7", "running": "put"})
    locks.release_with("j7", "put", token, {"uploaded_upload_id": "u1", "size": "42"})
    record = {k.decode(): v.decode() for k, v in client.hgetall(job_key("j7")).items()}
    assert record == {"id": "j7", "uploaded_upload_id": "u1", "size": "42"}  # running cleared
    assert client.get(lock_key("j7", "put")) is None
    assert locks.held() == []
    # the runner's release at the step's end is then a no-op: it does not touch a mark set since
    client.hset(job_key("j7"), "running", "link")
    locks.release("j7", "put", token)
    assert client.hget(job_key("j7"), "running") == b"link"


def test_the_last_write_does_not_bring_back_a_purged_record(redis_url: str) -> None:
    client, locks, token = _holding(redis_url, "j8", "generate", {"id": "j8"})
    client.delete(job_key("j8"))  # `dead purge` or expiry while the step ran
    locks.release_with("j8", "generate", token, {"upload_id": "u1"})
    assert not client.exists(job_key("j8"))
    assert client.get(lock_key("j8", "generate")) is None


def test_the_last_write_of_a_holder_whose_lock_was_taken_over_leaves_the_lock(redis_url: str) -> None:
    client, locks, token = _holding(redis_url, "j9", "put", {"id": "j9", "running": "put"})
    client.set(lock_key("j9", "put"), "their-token", ex=60)
    locks.release_with("j9", "put", token, {"size": "1"})
    assert client.get(lock_key("j9", "put")) == b"their-token"
    assert client.hget(job_key("j9"), "running") == b"put"  # theirs
    assert client.hget(job_key("j9"), "size") == b"1"
