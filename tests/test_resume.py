"""The ledger of messages a worker held across a broker reconnect (workers/resume.py), settled
with kombu's own Redis transport against a real redis-server."""

from __future__ import annotations

import json

import redis
from kombu import Connection, Exchange, Queue

from producers.broker import broker_transport_options
from workers.resume import FORGET, RESTORE, RUNNING, Ledger

QUEUE = "resume-test"


def held_message(conn: Connection, body: str) -> tuple[object, str]:
    """Publish one message and take it unacknowledged: it now sits in kombu's `unacked` hash."""
    channel = conn.channel()
    queue = Queue(QUEUE, Exchange(QUEUE), routing_key=QUEUE)
    queue(channel).declare()
    conn.Producer(channel).publish({"b": body}, exchange=queue.exchange, routing_key=QUEUE)
    message = queue(channel).get(no_ack=False)
    assert message is not None
    return channel, message.delivery_tag


def test_held_messages_are_restored_failed_acks_cleared_and_running_ones_left(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    with Connection(redis_url, transport_options=broker_transport_options()) as conn:
        channel, waiting = held_message(conn, "waiting")
        _, running = held_message(conn, "running")
        _, acked = held_message(conn, "acked")
        assert client.hlen("unacked") == 3 and client.llen(QUEUE) == 0

        ledger = Ledger()
        ledger.note_held([waiting, running, acked], running=[running, acked])
        assert ledger.pending() == {waiting: RESTORE, running: RUNNING, acked: RUNNING}
        ledger.note_failed(acked, requeue=None)  # its ack failed on the closed channel
        assert ledger.pending()[acked] == FORGET  # nothing to settle on yet: not connected

        assert ledger.connected(channel.qos) is None
        assert ledger.pending() == {running: RUNNING}
        assert client.llen(QUEUE) == 1
        assert json.loads(client.lindex(QUEUE, 0))["headers"]["redelivered"] is True
        assert set(client.hkeys("unacked")) == {running.encode()}

        ledger.note_failed(running, requeue=True)  # its reject (requeue) failed: settled at once
        assert ledger.pending() == {} and client.hlen("unacked") == 0 and client.llen(QUEUE) == 2
    client.close()


def test_a_message_never_recorded_is_published_again(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    with Connection(redis_url, transport_options=broker_transport_options()) as conn:
        channel, tag = held_message(conn, "x")
        payload = json.loads(client.hget("unacked", tag))[0]
        client.delete("unacked", "unacked_index")  # as if BRPOP took it and the record was lost
        ledger = Ledger()
        ledger.note_unrecorded(tag, payload, QUEUE, QUEUE)
        ledger.connected(channel.qos)
        assert ledger.pending() == {}
        (raw,) = client.lrange(QUEUE, 0, -1)
        assert json.loads(raw)["body"] == payload["body"]
    client.close()
