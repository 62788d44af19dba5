"""A redelivered step that finds its dead holder's lock looks again when the lock lapses."""

from __future__ import annotations

from types import SimpleNamespace

import fakeredis

from producers.keys import step_lock_key
from workers.redelivery import MARGIN_SECONDS, lock_recheck_seconds, redelivered


def _task(info: dict[str, object] | None) -> SimpleNamespace:
    return SimpleNamespace(request=SimpleNamespace(delivery_info=info))


def test_only_a_redelivered_copy_counts_as_redelivered() -> None:
    assert redelivered(_task({"redelivered": True}))
    assert not redelivered(_task({"redelivered": False}))
    assert not redelivered(_task(None))


def test_a_redelivered_copy_looks_again_just_after_the_lock_lapses() -> None:
    client = fakeredis.FakeRedis()
    client.set(step_lock_key("j1", "put"), "dead-holder", px=4000)
    wait = lock_recheck_seconds(client, "j1", "put", True, 20.0)
    assert 4.0 < wait <= 4.0 + MARGIN_SECONDS
    # a long lock: never later than the fixed recheck
    client.set(step_lock_key("j2", "put"), "holder", px=60_000)
    assert lock_recheck_seconds(client, "j2", "put", True, 20.0) == 20.0
    # the lock is gone by now: look again at once
    assert lock_recheck_seconds(client, "j3", "put", True, 20.0) == MARGIN_SECONDS


def test_a_copy_that_was_not_redelivered_keeps_the_fixed_recheck() -> None:
    client = fakeredis.FakeRedis()
    client.set(step_lock_key("j1", "put"), "live-holder", px=4000)
    assert lock_recheck_seconds(client, "j1", "put", False, 20.0) == 20.0
