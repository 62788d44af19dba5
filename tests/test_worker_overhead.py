"""What keeps a worker's CPU per job low, tested apart from a fleet: one Redis client object per
kombu channel, task events sent in batches, redaction that lets plain lines through untouched."""

from __future__ import annotations

import threading
from collections import Counter

import pytest
import redis
from celery import Celery
from celery.worker.consumer import events as consumer_events
from kombu import Connection

from ops.redis_server import command_calls
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


def test_a_delivered_message_and_its_ack_cost_redis_two_commands_each_without_multi(redis_url: str) -> None:
    """Before plain_pipeline, kombu wrapped both in MULTI/EXEC: 4 commands each."""
    import redis

    kombu_fixes.install()
    admin = redis.Redis.from_url(redis_url)
    with Connection(redis_url, transport_options={"visibility_timeout": 3600}) as conn:
        queue = conn.SimpleQueue("overhead-ack")
        queue.put({"n": 1})
        admin.config_resetstat()
        message = queue.get(timeout=5)
        delivered = _calls(admin)
        assert admin.hlen("unacked") == 1 and admin.zcard("unacked_index") == 1  # held while it runs
        message.ack()
        acked = _calls(admin) - delivered
        queue.close()
    assert admin.hlen("unacked") == 0 and admin.zcard("unacked_index") == 0
    for seen in (delivered, acked):
        assert "multi" not in seen and "exec" not in seen, seen
    assert delivered["zadd"] == 1 and delivered["hset"] == 1, delivered
    assert acked["zrem"] == 1 and acked["hdel"] == 1, acked


def _calls(client: redis.Redis) -> Counter[str]:
    calls = command_calls(client)
    del calls["info"]
    return calls


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


class _LoopConsumer:
    """What Celery's Events bootstep reads from its consumer, on the in-memory transport."""

    def __init__(self, app: Celery, hub: object | None) -> None:
        self.app = app
        self.hub = hub
        self.hostname = "w@test"
        self.amqheartbeat = 0
        self.event_dispatcher = None
        self.buffered: list[str] = []  # the threads that asked the loop for a flush

    def connection_for_write(self, heartbeat: float | None = None) -> Connection:
        return self.app.connection_for_write()

    def on_send_event_buffered(self) -> None:
        self.buffered.append(threading.current_thread().name)


@pytest.mark.parametrize("hub", [object(), None], ids=["event-loop", "no-event-loop"])
def test_a_pool_thread_never_publishes_task_events_only_the_loop_does(hub: object | None) -> None:
    """Celery flushes the event buffer inline in the thread that buffers the 24th event: with the
    threads pool on RabbitMQ a pool thread published, then read the dispatcher's socket for the
    confirm while the loop read it too, and the worker stopped consuming (workers/event_batching.py)."""
    app = Celery("events-test", broker="memory://", set_as_current=False)
    consumer = _LoopConsumer(app, hub)
    step = consumer_events.Events(consumer, task_events=True, without_heartbeat=True, without_gossip=True)
    step.start(consumer)
    dispatcher = consumer.event_dispatcher
    assert dispatcher is not None
    publishers: list[str] = []
    real_publish = dispatcher._publish

    def publish(event: object, *args: object, **kwargs: object) -> None:
        publishers.append(threading.current_thread().name)
        real_publish(event, *args, **kwargs)

    dispatcher._publish = publish  # type: ignore[method-assign]

    def pool_thread() -> None:
        for n in range(200):  # received, started, succeeded of ~70 steps between two flushes
            dispatcher.send("task-succeeded", uuid=str(n), result="x", runtime=0.01)

    worker = threading.Thread(target=pool_thread, name="ThreadPoolExecutor-0_0")
    worker.start()
    worker.join()
    try:
        if hub is None:  # no loop: Celery buffers nothing and publishes each event where sent
            assert publishers == ["ThreadPoolExecutor-0_0"] * 200
            return
        assert publishers == [], "a pool thread published on the event connection"
        assert set(consumer.buffered) == {"ThreadPoolExecutor-0_0"}
        dispatcher.flush()  # the loop thread's timer (event_batching._flush)
        assert publishers == [threading.current_thread().name]  # one task.multi with all 200
        assert dispatcher._group_buffer["task"] == []
    finally:
        step.shutdown(consumer)
        app.close()


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
