"""What keeps a worker's CPU per job low, tested apart from a fleet: one Redis client object per
kombu channel, task events sent in batches, redaction that lets plain lines through untouched."""

from __future__ import annotations

import pytest
from kombu import Connection

from workers import event_batching, kombu_fixes, logging_setup


def test_a_kombu_channel_reuses_one_redis_client(redis_url: str) -> None:
    kombu_fixes.install()
    with Connection(redis_url) as conn:
        channel = conn.default_channel
        with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
            assert first is second
            assert first.ping()
        given = object()
        with channel.conn_or_acquire(given) as passed:
            assert passed is given


class _Hub:
    def __init__(self) -> None:
        self.soon: list = []
        self.later: list = []

    def call_soon(self, callback: object) -> None:
        self.soon.append(callback)

    def call_later(self, delay: float, callback: object, *args: object) -> None:
        self.later.append((delay, callback, args))


class _Consumer:
    def __init__(self) -> None:
        self.hub = _Hub()
        self.flushes = 0

    def _flush_events(self) -> None:
        self.flushes += 1


def test_task_events_are_flushed_once_per_batch() -> None:
    consumer = _Consumer()
    for _ in range(10):  # ten events from the pool's threads
        event_batching.on_send_event_buffered(consumer)
    assert len(consumer.hub.soon) == 1 and consumer.flushes == 0
    consumer.hub.soon[0]()  # the loop thread schedules the flush
    ((delay, callback, args),) = consumer.hub.later
    assert delay == event_batching.EVENT_FLUSH_SECONDS
    callback(*args)
    assert consumer.flushes == 1
    event_batching.on_send_event_buffered(consumer)  # the next event starts a new batch
    assert len(consumer.hub.soon) == 2


def _redact_every_pattern(text: str) -> str:
    for pattern, repl in logging_setup._PATTERNS:
        text = pattern.sub(repl, text)
    return text


@pytest.mark.parametrize(
    "text",
    [
        "step=put job=abc outcome=ok attempt=1",
        "Authorization: Bearer abc.def",
        "PUT https://h/x?sv=1&SIG=secret%2Fvalue",
        "redis://user:pa55@host:6379/0",
        "https://u:p@host/path",
        "X-API-KEY: k123",
        "Cookie: a=b; c=d",
        "PASSWORD=hunter2",
        "Ap\u0131Key=1",  # a dotless i, which (?i) takes for an i
        "{'\u017fecret': 'x'}",  # a long s, which (?i) takes for an s
        "token=abc",
        "nothing to see at all",
    ],
)
def test_the_redaction_shortcut_changes_no_outcome(text: str) -> None:
    assert logging_setup.redact(text) == _redact_every_pattern(text)


def test_plain_lines_are_not_searched(monkeypatch: pytest.MonkeyPatch) -> None:
    searched: list[str] = []

    class Spy:
        def sub(self, repl: str, text: str) -> str:
            searched.append(text)
            return text

    monkeypatch.setattr(logging_setup, "_PATTERNS", ((Spy(), ""),))
    logging_setup.redact("step=put job=abc outcome=ok attempt=1 workspace=default")
    assert searched == []
    logging_setup.redact("Authorization: Bearer x")
    assert searched
