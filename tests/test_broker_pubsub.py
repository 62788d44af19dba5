"""The consumer loop's pub/sub read never blocks for ever (issue #12), against a real redis-server.

After a Redis restart kombu's pub/sub socket reads as readable (its EOF); kombu then called
redis-py's blocking `PubSub.parse_response()`, whose retry layer reconnected to the restarted
server without re-subscribing and read with no timeout: the worker's whole consumer loop hung.
workers/kombu_fixes.py bounds that read; these tests drive kombu's own channel code (that
broadcasts still arrive is shown by every fleet test that pings its workers).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection, Consumer, Exchange, Queue

import workers.kombu_fixes  # noqa: F401  (installs the fixes, as the worker app does)
from ops.redis_server import RedisServer
from producers.broker import BROKER_SOCKET_TIMEOUT_SECONDS, broker_transport_options


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    srv = RedisServer(tmp_path / "redis", appendonly=False).start()
    yield srv
    srv.stop()


def listening_channel(url: str) -> tuple[Connection, Any]:
    """A kombu channel consuming a fanout queue (as Celery's pidbox does), subscribed."""
    conn = Connection(url, transport_options=broker_transport_options())
    channel = conn.channel()
    exchange = Exchange("bcast-test", type="fanout")
    consumer = Consumer(channel, [Queue("bcast-test-q", exchange)], callbacks=[lambda body, message: None])
    consumer.consume()
    conn.transport.cycle.on_poll_start()  # registers the pub/sub socket and sends PSUBSCRIBE
    return conn, channel


def receive_in_thread(channel: Any, limit: float) -> tuple[bool, list[BaseException]]:
    """Run channel._receive() as the event loop would; (returned within `limit`, errors)."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            channel._receive()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(limit)
    return not thread.is_alive(), errors


def test_a_redis_restart_ends_the_pubsub_read_with_a_connection_error(server: RedisServer) -> None:
    conn, channel = listening_channel(server.url)
    try:
        receive_in_thread(channel, 5)  # the PSUBSCRIBE confirmation
        server.restart()  # SIGKILL, start again on the same port: the old socket reads EOF
        time.sleep(0.2)
        done, errors = receive_in_thread(channel, BROKER_SOCKET_TIMEOUT_SECONDS + 5)
        assert done, "the pub/sub read blocked the consumer loop"
        # a connection error makes Celery reconnect (and kombu subscribe the new connection)
        assert errors and isinstance(errors[0], conn.connection_errors), errors
    finally:
        conn.release()


def test_a_spurious_wakeup_does_not_block(server: RedisServer) -> None:
    conn, channel = listening_channel(server.url)
    try:
        receive_in_thread(channel, 5)
        started = time.monotonic()
        done, errors = receive_in_thread(channel, 5)  # nothing to read
        assert done and not errors
        assert time.monotonic() - started < 1
    finally:
        conn.release()
