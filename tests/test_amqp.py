"""RabbitMQ as the broker (BROKER_URL=amqp://), Redis for state: quorum queues, native delayed
delivery for countdowns, publisher confirms, and a dead worker's step taken up again by the
broker's own redelivery.

Uses the machine's RabbitMQ on 127.0.0.1:5672 (guest/guest) in a vhost of its own, deleted at the
end (ops/rabbitmq.py); skipped where there is none. Real redis-server, sandbox and worker
processes, with the short recovery timings of tests/fleet.py, except that the sweeper's stall
duty is slowed down to minutes: a step that resumes within seconds was redelivered by RabbitMQ.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from kombu import Connection, Exchange, Producer
from kombu.transport.native_delayed_delivery import (
    bind_queue_to_native_delayed_delivery_exchange,
    declare_native_delayed_delivery_exchanges_and_queues,
)

from ops.demo_files import random_file
from ops.rabbitmq import Vhost, message_stats, reachable, ready_in
from ops.redis_server import RedisServer
from producers.broker import celery_config
from producers.canvas import message_options, publisher_app
from producers.config import ConfigError
from producers.contract import (
    QUEUE_API,
    QUEUE_CALLBACKS,
    QUEUE_TRANSFER,
    TASK_GENERATE_UPLOAD_URL,
    TASK_PUT_FILE,
)
from producers.keys import job_key
from producers.messages import fast_path_supported
from producers.priority import Priority
from producers.records import JobStore
from producers.redrive import canvas_from
from producers.transport import queue_ready
from tests.fleet import FAST, Fleet, kill_a_running_put, wait_until
from workers.sweeper import Sweeper

pytestmark = pytest.mark.skipif(not reachable(), reason="no RabbitMQ on 127.0.0.1:5672")

STEP_QUEUES = (QUEUE_API, QUEUE_TRANSFER, QUEUE_CALLBACKS)
# The sweeper would re-drive a dead worker's step after 3 s of FAST; at 300 s a step that comes
# back within the test's bound was redelivered by RabbitMQ.
BROKER_ONLY = {**FAST, "AWORK_SWEEPER_STALL": "300", "AWORK_SWEEPER_LOST_COUNTDOWN": "300"}
# 40% of links meet a 503 below: with tests/fleet.py's 6 attempts one of 12 jobs went dead about
# once in 20 runs (0.4**6 x 12); with 12 attempts that is about once in 5,000.
RETRY_ENOUGH = {"AWORK_MAX_ATTEMPTS": "12"}


# -- configuration ---------------------------------------------------------------------------------


def test_broker_url_makes_quorum_queues_with_confirms_and_delayed_delivery(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/x")
    conf = celery_config("redis://127.0.0.1:1/0")
    assert conf["broker_url"] == "amqp://guest:guest@127.0.0.1:5672/x"
    assert [q.name for q in conf["task_queues"]] == list(STEP_QUEUES)
    for queue in conf["task_queues"]:
        assert queue.queue_arguments == {"x-queue-type": "quorum"}
        assert queue.exchange.type == "topic"  # native delayed delivery skips direct exchanges
    assert conf["broker_transport_options"]["confirm_publish"] is True
    assert "visibility_timeout" not in conf["broker_transport_options"]
    assert conf["worker_detect_quorum_queues"] is True
    assert conf["broker_native_delayed_delivery_queue_type"] == "quorum"
    assert conf["task_acks_late"] and conf["task_reject_on_worker_lost"]
    # the producers publish through Celery, never straight into the state Redis' lists
    assert not fast_path_supported("redis://127.0.0.1:1/0")


def test_without_broker_url_redis_carries_the_messages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BROKER_URL", raising=False)
    conf = celery_config("redis://127.0.0.1:1/0")
    assert conf["broker_url"] == "redis://127.0.0.1:1/0"
    assert conf["broker_transport_options"]["visibility_timeout"] > 0
    assert all(q.exchange.type == "direct" and not q.queue_arguments for q in conf["task_queues"])
    assert fast_path_supported("redis://127.0.0.1:1/0")
    for other in ("kafka://127.0.0.1:9092", "redis://127.0.0.1:2/0"):
        monkeypatch.setenv("BROKER_URL", other)
        with pytest.raises(ConfigError, match="BROKER_URL"):
            celery_config("redis://127.0.0.1:1/0")


PROBE = """
from types import SimpleNamespace
from kombu.transport import redis as kombu_redis
import workers.kombu_fixes as fixes
from workers.celery_app import app
from workers.resume import ResumeStep
step = ResumeStep.__new__(ResumeStep)
patched = kombu_redis.Channel._receive_one is fixes.bounded_pubsub_reads
print(patched, step.include_if(SimpleNamespace(app=app)))
"""


@pytest.mark.parametrize(
    ("broker", "expected"), [("", "True True"), ("amqp://guest:guest@127.0.0.1/x", "False False")]
)
def test_the_redis_transport_guards_are_on_only_for_redis(broker: str, expected: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("BROKER_URL", "REDIS_URL")}
    env.update(REDIS_URL="redis://127.0.0.1:1/0", **({"BROKER_URL": broker} if broker else {}))
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == expected, out.stderr[-2000:]


def test_job_priorities_keep_their_order_on_rabbitmq(monkeypatch: pytest.MonkeyPatch) -> None:
    """kombu's Redis transport reads priority 0 first; RabbitMQ reads higher numbers first."""
    steps = [
        message_options(TASK_GENERATE_UPLOAD_URL, Priority.HIGH),
        message_options(TASK_GENERATE_UPLOAD_URL, Priority.NORMAL),
        message_options(TASK_PUT_FILE, Priority.NORMAL),
        message_options(TASK_PUT_FILE, Priority.BULK),
    ]  # first to last
    monkeypatch.delenv("BROKER_URL", raising=False)
    on_redis = [o["priority"] for o in steps]
    assert on_redis == sorted(on_redis)
    monkeypatch.setenv("BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/x")
    on_rabbitmq = [
        message_options(TASK_GENERATE_UPLOAD_URL, Priority.HIGH)["priority"],
        message_options(TASK_GENERATE_UPLOAD_URL, Priority.NORMAL)["priority"],
        message_options(TASK_PUT_FILE, Priority.NORMAL)["priority"],
        message_options(TASK_PUT_FILE, Priority.BULK)["priority"],
    ]
    assert on_rabbitmq == sorted(on_rabbitmq, reverse=True)
    assert on_rabbitmq == [9 - p for p in on_redis]
    # RabbitMQ 4 quorum queues: 5 and above are high
    assert on_rabbitmq[0] >= 5 and on_rabbitmq[-1] < 5


def test_the_declared_queues_are_quorum_queues(vhost: Vhost, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BROKER_URL", vhost.url)
    conf = celery_config("redis://127.0.0.1:1/0")
    with Connection(vhost.url) as conn:
        channel = conn.channel()
        for queue in conf["task_queues"]:
            queue(channel).declare()
        # declaring the same name as a classic queue is refused: it exists as a quorum queue
        with pytest.raises(Exception, match="x-queue-type"):
            conn.channel().queue_declare(
                QUEUE_API, durable=True, auto_delete=False, arguments={"x-queue-type": "classic"}
            )
    assert set(STEP_QUEUES) <= set(message_stats(vhost.name))


def test_a_queue_reads_empty_only_when_rabbitmq_has_no_such_queue(vhost: Vhost) -> None:
    """404 NOT_FOUND is a queue no worker declared yet (0 messages); any other refusal of the
    passive declare says nothing about the queue, and the sweeper must not read it as empty."""
    with Connection(vhost.url) as owner, Connection(vhost.url) as other:
        assert queue_ready(other, "awork.test.never-declared") == 0
        owner.default_channel.queue_declare("awork.test.exclusive", exclusive=True)
        with pytest.raises(Exception, match="RESOURCE_LOCKED"):
            queue_ready(other, "awork.test.exclusive")  # 405: another connection's exclusive queue


def _quiet_job(client: redis.Redis) -> dict[str, str]:
    """A published job whose record has shown no sign of life for an hour."""
    old = repr(time.time() - 3600)
    record = {
        "id": uuid.uuid4().hex, "state": "queued", "workspace": "default", "target": "task:t",
        "route": "byuploadid", "file_name": "q.txt", "content_type": "text/plain",
        "source_kind": "file", "source": "", "staged_owned": "0", "published": "1",
        "created_at": old, "updated_at": old,
    }  # fmt: skip
    JobStore(client).create(record, None)
    return record


def test_the_sweeper_leaves_a_quiet_job_queued_in_rabbitmq_alone(
    vhost: Vhost, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On Redis a job with no sign of life whose message is in no queue list is re-driven; on
    RabbitMQ the lists are empty by design, and the job is simply waiting in a queue."""
    monkeypatch.setenv("BROKER_URL", vhost.url)
    server = RedisServer(tmp_path / "redis").start()
    try:
        client = redis.Redis.from_url(server.url)
        record = _quiet_job(client)
        job_id = record["id"]
        app = publisher_app(server.url)
        try:
            canvas_from(app, record, "generate").apply_async()
        finally:
            app.close()
        wait_until(lambda: ready_in(vhost.url, QUEUE_API) == 1, 10, "message in RabbitMQ")
        sweeper = Sweeper(client, server.url)
        assert not sweeper.broker.redis_transport
        result = sweeper.sweep_once(now=time.time() + 3600)
        assert result.redriven == 0 and result.republished == 0
        assert ready_in(vhost.url, QUEUE_API) == 1  # not published a second time
        assert client.hget(job_key(job_id), "redrives") is None
        # once no step queue holds anything, the quiet job's message is lost: it is re-driven
        with Connection(vhost.url) as conn:
            conn.default_channel.queue_purge(QUEUE_API)
        result = sweeper.sweep_once(now=time.time() + 3600)
        assert result.redriven == 1
        assert client.hget(job_key(job_id), "redrive_reason") == b"lost-job"
        wait_until(lambda: ready_in(vhost.url, QUEUE_API) == 1, 10, "message published again")
        client.close()
    finally:
        server.stop()


def test_a_sweeper_pass_does_not_wait_for_a_rabbitmq_that_never_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, the pass read the step queues through a connection with kombu's retries (2 s
    sleeps) and no read timeout of its own: each pass against this broker took 12 s."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()  # the kernel accepts; nobody ever answers
    monkeypatch.setenv("BROKER_URL", f"amqp://guest:guest@127.0.0.1:{silent.getsockname()[1]}/awork")
    server = RedisServer(tmp_path / "redis").start()
    try:
        client = redis.Redis.from_url(server.url)
        job_id = _quiet_job(client)["id"]
        sweeper = Sweeper(client, server.url)
        assert not sweeper.broker.redis_transport
        for _ in range(2):
            started = time.monotonic()
            result = sweeper.sweep_once(now=time.time() + 3600)
            assert time.monotonic() - started < 5
            assert result.redriven == 0  # not known to be lost: left for a pass that can tell
        assert client.hget(job_key(job_id), "redrives") is None
        sweeper.stop()
        client.close()
    finally:
        server.stop()
        silent.close()


def test_a_countdown_under_a_second_is_published_not_refused(
    vhost: Vhost, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Celery truncates the countdown to whole seconds for native delayed delivery, and kombu
    refuses 0: a 0.4 s retry raised ValueError (and the retry dropped the job's message)."""
    monkeypatch.setenv("BROKER_URL", vhost.url)
    app = publisher_app("redis://127.0.0.1:1/0")
    try:
        with app.connection_for_write() as conn:
            declare_native_delayed_delivery_exchanges_and_queues(conn, "quorum")
            for queue in app.conf.task_queues:
                queue(conn.default_channel).declare()
                bind_queue_to_native_delayed_delivery_exchange(conn, queue)
            conn.default_channel.queue_purge(QUEUE_API)  # what earlier tests left there
        started = time.monotonic()
        app.send_task(
            "awork.generate_upload_url", kwargs={"job_id": "0" * 32}, queue=QUEUE_API, countdown=0.4
        )
        wait_until(lambda: ready_in(vhost.url, QUEUE_API) == 1, 15, "delayed message delivered")
        assert time.monotonic() - started >= 0.9  # it went through the delay queues
    finally:
        app.close()
        with Connection(vhost.url) as conn:
            conn.default_channel.queue_purge(QUEUE_API)


def test_a_retried_publish_reconnects_once_after_its_connection_died_uncollected(
    vhost: Vhost, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kombu's retried declare kept declaring on the dead connection's channel and made a fresh
    connection after each failure, for ever (a worker's loop spun in its heartbeat event's publish
    with thousands of connections a second): producers/transport.py declare_on_the_revived_channel."""
    monkeypatch.setenv("BROKER_URL", vhost.url)
    celery_config("redis://127.0.0.1:1/0")  # installs the RabbitMQ patches
    conn = Connection(vhost.url, heartbeat=10, transport_options={"confirm_publish": True})
    exchange = Exchange("awork.test.events", type="topic")
    producer = Producer(conn, exchange=exchange, auto_declare=False)
    publish = {
        "routing_key": "worker.heartbeat",
        "exchange": exchange.name,
        "retry": True,
        "declare": [exchange],
    }
    try:
        producer.publish({"n": 1}, **publish)
        dead = conn.connection
        dead.sock.shutdown(socket.SHUT_RDWR)  # the broker closed it...
        dead.transport.connected = False  # ...and py-amqp saw it (a failed ack or read)
        assert conn.connection is not dead  # kombu reconnects silently; the dead one is not collected
        made = []
        factory = conn._connection_factory

        def counted() -> object:
            made.append(1)
            return factory()

        monkeypatch.setattr(conn, "_connection_factory", counted)
        outcome: list[object] = []
        publisher = threading.Thread(
            target=lambda: outcome.append(producer.publish({"n": 2}, **publish)), daemon=True
        )
        publisher.start()
        publisher.join(10)
        assert outcome, f"the publish still retrying after 10 s, {len(made)} connections made"
        assert len(made) <= 2
    finally:
        conn.close()


# -- a fleet on RabbitMQ -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fleet(vhost: Vhost, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BROKER_URL", vhost.url)  # the workers inherit it; the producers read it
        f = Fleet(
            tmp_path_factory.mktemp("amqp"),
            worker_count=2,
            concurrency=4,
            extra_env={**BROKER_ONLY, **RETRY_ENOUGH},
            sandbox_args=["--seed", "4343"],
        ).start()
        try:
            yield f
        finally:
            f.stop()


def _queues_drained(vhost: Vhost) -> bool:
    return all(ready_in(vhost.url, q) == 0 for q in STEP_QUEUES)


def test_a_fleet_on_rabbitmq_ends_every_job_done(fleet: Fleet, vhost: Vhost, tmp_path: Path) -> None:
    # 503s on the link route: retries with a countdown, through native delayed delivery
    fleet.sandbox.set_faults({"routes": {"link": {"503": 0.4}}})
    try:
        jobs = []
        entities = []
        for n in range(12):
            entity = fleet.entity("tasks")
            entities.append(entity)
            f = random_file(tmp_path / f"f{n}.bin", 2_000 + 7_000 * n)
            jobs.append(fleet.uploads.enqueue(f, to=f"task:{entity}"))
        finals = fleet.wait(jobs, timeout=120)
    finally:
        fleet.sandbox.set_faults({"routes": {"link": {"503": 0}}})
    assert [j.state.value for j in finals] == ["done"] * len(jobs), [j.error for j in finals]
    for entity in entities:
        assert len(fleet.files_of(entity)) == 1
    links = fleet.sandbox.stats()["links"]
    assert all(links[j.upload_id] == 1 for j in finals if j.upload_id)
    retried = [j for j in jobs if int(fleet.record(j.id).get("attempts_link", "0") or 0) > 1]
    stats = message_stats(vhost.name)
    assert "celery_delayed_0" in stats, stats  # the workers declared native delayed delivery
    wait_until(lambda: _queues_drained(vhost), 20, "step queues drained")
    assert retried, "no link was retried: the countdown path went untested"


# What a worker logs when its consumer connection went away under it (a stalled event loop that
# RabbitMQ closed for missed heartbeats shows as both).
CONNECTION_LOST = ("Connection to broker lost", "Couldn't ack")


@pytest.mark.slow
def test_workers_on_rabbitmq_keep_consuming_through_bursts_of_task_events(
    fleet: Fleet, tmp_path: Path
) -> None:
    """Bursts of short steps (and retried links) fill a worker's task-event buffer within one
    batching window. Celery flushed the full buffer from the pool thread that filled it, which read
    the event connection's socket for the publish confirm while the event loop read it too: the
    loop stopped (no message consumed, no AMQP heartbeat) until RabbitMQ closed the worker's
    connections 20-30 s later, or for good (workers/event_batching.py). Before the fix a worker
    lost its connections in most runs of these rounds."""
    marks = {w.log_path: w.log_path.stat().st_size for w in fleet.workers}
    fleet.sandbox.set_faults({"routes": {"link": {"503": 0.3}}})
    try:
        for burst in range(4):
            jobs = []
            for n in range(16):
                f = random_file(tmp_path / f"b{burst}-{n}.bin", 1_000 + 500 * n)
                jobs.append(fleet.uploads.enqueue(f, to=f"task:{fleet.entity('tasks')}"))
            finals = fleet.wait(jobs, timeout=90)
            assert [j.state.value for j in finals] == ["done"] * len(jobs), [j.error for j in finals]
    finally:
        fleet.sandbox.set_faults({"routes": {"link": {"503": 0}}})
    lost = []
    for path, mark in marks.items():
        with path.open("rb") as log:
            log.seek(mark)
            text = log.read().decode(errors="replace")
        lost += [
            f"{path.name}: {line}"
            for line in text.splitlines()
            if line.startswith("[") and any(s in line for s in CONNECTION_LOST)
        ]
    assert not lost, "\n".join(lost)


@pytest.mark.timing
def test_a_step_killed_with_its_worker_is_redelivered_by_rabbitmq_within_seconds(
    fleet: Fleet, tmp_path: Path
) -> None:
    job, entity, killed_at = kill_a_running_put(fleet, tmp_path)
    # the next copy of the step notes the crash as it starts
    wait_until(lambda: fleet.record(job.id).get("crashes_put") == "1", 60, "put running again")
    resumed_in = time.monotonic() - killed_at
    (final,) = fleet.wait([job], timeout=60)
    print(f"\nput resumed {resumed_in:.1f} s after its worker was SIGKILLed (RabbitMQ redelivery)")
    assert final.state.value == "done", final.error
    record = fleet.record(job.id)
    assert "redrive_reason" not in record  # RabbitMQ redelivered it; the sweeper did nothing
    # redelivered at once; the copy looks again as soon as the dead holder's lock (4 s) lapses
    assert resumed_in < 12
    assert len(fleet.files_of(entity)) == 1
    assert fleet.sandbox.stats()["links"][record["upload_id"]] == 1
