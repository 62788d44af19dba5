"""Nothing lost, nothing twice: crashes, restarts, poison steps, dead letters, unknown outcomes.

Real redis-server, real `celery -A workers worker` processes, the sandbox over loopback. The
fleet runs with short recovery timings (documented in workers/sweeper.py and
workers/step_lock.py) so that a lost step comes back in seconds instead of about a minute:

    lock TTL 4 s, heartbeat 1 s, sweeper every 1 s, stall 3 s, re-drive cooldown 4 s,
    unpublished records after 3 s, idle jobs after 20 s, poison after 2 crashes,
    shutdown grace 5 s.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu.exceptions import OperationalError

from ops.demo_files import random_file
from ops.redis_server import RedisServer, command_calls
from producers import publish as publish_module
from producers.broker import celery_config
from producers.client import PublishFailed, Uploads
from producers.config import SharedSettings
from producers.keys import ACTIVE_KEY, DEAD_KEY, INDEX_KEY, job_key
from producers.redrive import canvas_from
from tests.fleet import FAST, Fleet, holder_of, kill_a_running_put, put_running, wait_until
from workers.orphan_staging import remove_orphan_staging
from workers.queue_metrics import BrokerLayout
from workers.sweeper import Sweeper
from workers.sweeper_rules import MAYBE_LOST, SweeperTimings, message_job_id, payload_job_id, stalled_reason

NO_FAULTS = {
    "routes": {
        r: {"500": 0, "503": 0, "429": 0, "drop": 0, "drop_after": 0, "500_after": 0, "latency_ms": 0}
        for r in ("*", "generate", "link", "image_link", "multipart", "list", "blob")
    },
    "latency_ms": 0,
    "jitter_ms": 0,
    "upload_url_lifetime_s": 900,
    "duplicate_on_relink": False,
}


# -- the sweeper's rules, without a fleet --------------------------------------------------------


def test_stalled_reason_rules() -> None:
    now = 10_000.0
    base = {"state": "uploading", "published": "1", "updated_at": str(now - 1000), "heartbeat_at": ""}
    t = SweeperTimings()
    stall, lost, orphan, idle = t.stall, t.lost_countdown, t.orphan_message, t.idle
    assert stalled_reason({**base, "state": "done"}, False, now) is None
    # a running step: lost only when its lock is gone and its heartbeat is old
    running = {**base, "running": "put", "heartbeat_at": str(now - stall - 1)}
    assert stalled_reason(running, False, now) == "lost-put"
    assert stalled_reason(running, True, now) is None
    assert stalled_reason({**running, "heartbeat_at": str(now - 1)}, False, now) is None
    # re-driven a moment ago: leave it alone
    assert stalled_reason({**running, "redriven_at": str(now - 1)}, False, now) is None
    # a producer that died between record and message
    fresh = {**base, "published": "0", "created_at": str(now - 1)}
    assert stalled_reason(fresh, False, now) is None
    assert stalled_reason({**fresh, "created_at": str(now - 1000)}, False, now) == "unpublished"
    # a countdown: pending, then overdue with its message in a dead worker's hands, or nowhere
    waiting = {**base, "wait_until": str(now - 1), "updated_at": str(now - 5)}
    assert stalled_reason(waiting, False, now, oldest_message=now - 100) is None
    overdue = {**base, "wait_until": str(now - lost - 1), "updated_at": str(now - lost - 5)}
    assert stalled_reason(overdue, False, now, oldest_message=now - 1000) == "lost-countdown"
    assert stalled_reason(overdue, False, now) == MAYBE_LOST
    # a message held with nothing to show for it
    quiet = {**base, "updated_at": str(now - orphan - 1)}
    assert stalled_reason(quiet, False, now, oldest_message=now - orphan - 1) == "lost-message"
    assert stalled_reason(quiet, False, now, oldest_message=now - 1) is None
    # no sign of life and no message held: lost unless it waits in a queue (the sweeper looks)
    assert stalled_reason({**base, "updated_at": str(now - idle - 1)}, False, now) == MAYBE_LOST
    assert stalled_reason({**base, "updated_at": str(now - 1)}, False, now) is None


def test_job_ids_are_read_from_queued_and_unacked_messages(
    producer_env: dict[str, str], tmp_path: Path
) -> None:
    src = random_file(tmp_path / "a.bin", 100)
    with Uploads.from_env() as up:
        job = up.enqueue(src, to=f"task:{uuid.uuid4()}")
        (raw,) = [m for k in BrokerLayout().list_keys("awork.api") for m in up.redis.lrange(k, 0, -1)]
    assert payload_job_id(raw) == job.id
    entry = json.dumps([json.loads(raw), "awork.api", "awork.api"])
    assert message_job_id(entry) == job.id
    assert message_job_id(b"not json") is None and payload_job_id(b"{}") is None


def test_a_sweep_reads_the_step_locks_of_a_batch_in_one_round_trip(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stale jobs with a live step lock are left alone, the unlocked one is re-driven, and the
    locks of the whole batch cost one round trip, not one per job (what the re-drive itself
    publishes stays far below one per job)."""
    client = redis.Redis.from_url(redis_url)
    now = time.time()
    old = now - 10 * SweeperTimings().idle
    jobs = {name: uuid.uuid4().hex for name in ("running", "next", "lost")}
    locked = [(jobs["running"], "put")] + [(uuid.uuid4().hex, "put") for _ in range(100)]
    locked.append((jobs["next"], "link"))  # no `running` mark: every step's lock is looked at
    for job_id, step in [*locked, (jobs["lost"], "")]:
        record = {
            "id": job_id,
            "state": "uploading",
            "workspace": "default",
            "target": f"task:{uuid.uuid4()}",
            "file_name": "f.bin",
            "published": "1",
            "upload_id": "u1",
            "created_at": repr(old),
            "updated_at": repr(old),
            "heartbeat_at": repr(old),
        }
        if step:
            client.set(job_key(job_id) + f":lock:{step}", "a worker", ex=60)
            if job_id != jobs["next"]:
                record["running"] = step
        client.hset(job_key(job_id), mapping=record)
        client.zadd(ACTIVE_KEY, {job_id: old})
    sweeper = Sweeper(client, redis_url)
    sends = 0
    send = redis.connection.Connection.send_packed_command

    def counting(self: redis.connection.Connection, *args: Any, **kwargs: Any) -> None:
        nonlocal sends
        sends += 1
        send(self, *args, **kwargs)

    monkeypatch.setattr(redis.connection.Connection, "send_packed_command", counting)
    try:
        result = sweeper.sweep_once(now=now)
        monkeypatch.undo()
        assert (result.scanned, result.redriven) == (len(locked) + 1, 1)
        assert client.hget(job_key(jobs["lost"]), "redriven_at") is not None
        assert all(client.hget(job_key(j), "redriven_at") is None for j, _ in locked)
        assert sends < len(locked)
    finally:
        sweeper.app.close()
        client.close()


def test_sweeper_prunes_indexes_and_staging(redis_url: str, tmp_path: Path) -> None:
    client = redis.Redis.from_url(redis_url)
    ids = {name: uuid.uuid4().hex for name in ("alive", "expired", "done", "failed")}
    for name in ("alive", "done", "failed"):
        client.hset(
            job_key(ids[name]), mapping={"id": ids[name], "state": name if name != "alive" else "uploading"}
        )
    for job_id in ids.values():
        client.zadd(INDEX_KEY, {job_id: time.time()})
    client.zadd(DEAD_KEY, {ids["failed"]: time.time(), ids["expired"]: time.time()})
    sweeper = Sweeper(client, redis_url, tmp_path)
    assert sweeper.prune_indexes() == 2  # "expired" from both zsets
    assert {i.decode() for i in client.zrange(INDEX_KEY, 0, -1)} == {ids["alive"], ids["done"], ids["failed"]}
    assert [i.decode() for i in client.zrange(DEAD_KEY, 0, -1)] == [ids["failed"]]
    for job_id in ids.values():
        (tmp_path / job_id).mkdir()
        (tmp_path / job_id / "f.bin").write_bytes(b"x")
        (tmp_path / f"{job_id}.block-md5").write_text("block digests")
    # block digests whose folder is already gone (a crash between the two deletes)
    lone = uuid.uuid4().hex
    (tmp_path / f"{lone}.block-md5").write_text("block digests")
    (tmp_path / "not-a-job.block-md5").write_text("left alone")
    assert remove_orphan_staging(client, tmp_path, min_age=0) == 3  # done, expired, lone
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [
            ids["alive"],
            ids["failed"],
            f"{ids['alive']}.block-md5",
            f"{ids['failed']}.block-md5",
            "not-a-job.block-md5",
        ]
    )
    client.close()


# -- producers: never a record without its message -----------------------------------------------


class _Publish:
    """Stands in for the canvas: the first `ok` publishes succeed, then the broker is gone."""

    def __init__(self, ok: int = 0, before_failing: Callable[[], None] | None = None) -> None:
        self.ok = ok
        self.before_failing = before_failing

    def __call__(self, *args: Any, **kwargs: Any) -> _Publish:
        return self

    def apply_async(self, **_: Any) -> None:
        if self.ok > 0:
            self.ok -= 1
            return
        if self.before_failing:
            self.before_failing()
        raise OperationalError("Error 111 connecting to 127.0.0.1. Connection refused.")


def test_a_failed_publish_leaves_no_record_and_no_staged_file(
    producer_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Celery's own publish (the path of brokers other than Redis): message by message."""
    from producers.spec import JobSpec

    staging = Path(producer_env["STAGING_DIR"])
    monkeypatch.setattr(publish_module, "job_canvas", _Publish(ok=1))
    srcs = [random_file(tmp_path / f"{i}.bin", 100) for i in range(3)]
    with Uploads.from_env() as up, pytest.raises(PublishFailed) as info:
        up._templates = None
        up.enqueue_many([JobSpec(s, f"task:{uuid.uuid4()}") for s in srcs])
    err = info.value
    assert len(err.published_ids) == 1 and err.pending_ids == []
    assert "1 job(s) of the batch were enqueued" in str(err)
    client = redis.Redis.from_url(producer_env["REDIS_URL"], decode_responses=True)
    (enqueued,) = err.published_ids
    assert client.hget(job_key(enqueued), "published") == "1"
    assert client.keys("awork:job:*") == [job_key(enqueued)]
    assert client.zrange(INDEX_KEY, 0, -1) == [enqueued] and client.zrange(ACTIVE_KEY, 0, -1) == [enqueued]
    assert [p.name for p in staging.iterdir()] == [enqueued]
    client.close()


def test_a_failed_prebuilt_publish_enqueues_none_of_the_batch(
    producer_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pre-built messages go out in one MULTI/EXEC: a batch is enqueued whole or not at all."""
    from producers.spec import JobSpec

    staging = Path(producer_env["STAGING_DIR"])
    client = redis.Redis.from_url(producer_env["REDIS_URL"], decode_responses=True)
    calls: list[int] = []

    def failing(conn: redis.Redis, messages: Any, keys: Any = ()) -> None:
        calls.append(len(messages))
        raise redis.exceptions.ConnectionError("Error 111 connecting to 127.0.0.1. Connection refused.")

    monkeypatch.setattr(publish_module, "publish_rendered", failing)
    srcs = [random_file(tmp_path / f"{i}.bin", 100) for i in range(3)]
    with Uploads.from_env() as up, pytest.raises(PublishFailed) as info:
        up._app.conf.task_publish_retry_policy = {"max_retries": 1, "interval_start": 0.01}
        up.enqueue_many([JobSpec(s, f"task:{uuid.uuid4()}") for s in srcs])
    assert info.value.published_ids == [] and info.value.pending_ids == []
    assert calls == [3, 3]  # the whole batch, tried again once (the retry policy)
    assert client.keys("awork:job:*") == [] and client.llen("awork.api") == 0
    assert list(staging.iterdir()) == []
    client.close()


def test_publish_and_cleanup_both_failing_says_which_jobs_will_still_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = RedisServer(tmp_path / "redis", appendfsync="always").start()
    try:
        monkeypatch.setenv("REDIS_URL", server.url)
        monkeypatch.setenv("STAGING_DIR", str(tmp_path / "staging"))

        def killed(*_: Any, **__: Any) -> None:
            server.kill()
            raise redis.exceptions.ConnectionError("Error 111 connecting to 127.0.0.1. Connection refused.")

        monkeypatch.setattr(publish_module, "publish_rendered", killed)
        src = random_file(tmp_path / "a.bin", 100)
        up = Uploads(SharedSettings.from_env(), redis_retry_seconds=1.0)
        with up, pytest.raises(PublishFailed) as info:
            up.enqueue(src, to=f"task:{uuid.uuid4()}")
        (pending,) = info.value.pending_ids
        assert "do not enqueue them again" in str(info.value)
        # the sweeper publishes it when Redis is back, so its bytes are kept
        assert (tmp_path / "staging" / pending).is_dir()
        server.start()
        client = redis.Redis.from_url(server.url, decode_responses=True)
        assert client.hget(job_key(pending), "published") == "0"
        client.close()
    finally:
        server.stop()


# -- the fleet -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    f = Fleet(
        tmp_path_factory.mktemp("recovery"),
        worker_count=2,
        concurrency=4,
        extra_env=FAST,
        sandbox_args=["--seed", "4242"],
    ).start()
    yield f
    f.stop()


@pytest.fixture(autouse=True)
def _healthy(request: pytest.FixtureRequest) -> Iterator[None]:
    if "fleet" not in request.fixturenames:
        yield
        return
    fleet: Fleet = request.getfixturevalue("fleet")
    yield
    fleet.sandbox.set_faults(NO_FAULTS)
    for child in [w for w in fleet.workers if not w.alive()]:
        fleet.restart(child)
    fleet.wait_ready()


def cli(fleet: Fleet, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **{k: fleet.env[k] for k in ("REDIS_URL", "STAGING_DIR", "AWORK_WORKSPACES_FILE")}}
    return subprocess.run(
        [sys.executable, "-m", "producers.cli", *args], env=env, capture_output=True, text=True, timeout=60
    )


def unacked_jobs(fleet: Fleet) -> list[str]:
    client = fleet.client()
    try:
        return [j for j in (message_job_id(raw) for raw in client.hvals("unacked")) if j]
    finally:
        client.close()


def test_a_step_killed_with_its_worker_resumes_on_another_within_two_minutes(
    fleet: Fleet, tmp_path: Path
) -> None:
    job, entity, killed_at = kill_a_running_put(fleet, tmp_path)
    (final,) = fleet.wait([job], timeout=120)
    resumed_in = time.monotonic() - killed_at
    assert final.state.value == "done", final.error
    assert resumed_in < 120
    record = fleet.record(job.id)
    assert record["crashes_put"] == "1"
    assert record["redrive_reason"] == "lost-put"
    assert len(fleet.files_of(entity)) == 1
    assert fleet.sandbox.stats()["links"][record["upload_id"]] == 1
    # The dead worker's message was moved back to the queue, not left to come back hours later...
    assert job.id not in unacked_jobs(fleet)
    # ...and a late copy of the steps (as that redelivery would be) finds the work done.
    canvas_from(fleet.uploads._app, record, "put").apply_async()
    client = fleet.client()
    wait_until(
        lambda: (
            sum(client.llen(k) for k in BrokerLayout().list_keys("awork.transfer")) == 0
            and job.id not in unacked_jobs(fleet)
        ),
        20,
        "late copy run",
    )
    client.close()
    time.sleep(0.5)
    assert len(fleet.files_of(entity)) == 1
    assert fleet.record(job.id)["file_id"] == record["file_id"]


def test_a_step_that_keeps_killing_its_worker_goes_to_dead_letters(fleet: Fleet, tmp_path: Path) -> None:
    fleet.sandbox.set_faults({"routes": {"blob": {"latency_ms": 60_000}}})
    entity = fleet.entity("tasks")
    f = random_file(tmp_path / "poison.bin", 50_000)
    job = fleet.uploads.enqueue(f, to=f"task:{entity}")
    kills = 0
    deadline = time.monotonic() + 120
    while fleet.record(job.id).get("state") != "dead":
        assert time.monotonic() < deadline, f"not dead after {kills} kills: {fleet.record(job.id)}"
        if put_running(fleet, job.id):
            victim = fleet.holder(job.id)
            if victim is not None:
                victim.kill()
                kills += 1
                fleet.restart(victim)
        time.sleep(0.2)
    final = fleet.uploads.status(job.id)
    assert fleet.record(job.id)["crashes_put"] == "3"  # AWORK_MAX_CRASHES=2: one too many
    assert kills >= 3
    assert final.error is not None and final.error.code == "poison" and final.error.step == "put"
    assert final.error.description == "put lost its worker 3 times"
    listed = [json.loads(line) for line in cli(fleet, "dead", "list", "--json").stdout.splitlines()]
    assert any(j["id"] == job.id and j["state"] == "dead" for j in listed)
    # Once the cause is gone, a retry runs it to the end, once.
    fleet.sandbox.set_faults({"routes": {"blob": {"latency_ms": 0}}})
    fleet.wait_ready()
    assert cli(fleet, "dead", "retry", job.id).returncode == 0
    (again,) = fleet.wait([job], timeout=60)
    assert again.state.value == "done", again.error
    assert len(fleet.files_of(entity)) == 1


def test_a_retried_dead_letter_reports_the_state_the_retry_set(
    producer_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The retry used to read the job back after publishing it: with a worker quick enough to
    take the message first, the CLI reported `linking` instead of `queued` (seen once in CI)."""
    from producers import dead_letters
    from producers.keys import DEAD_KEY

    client = redis.Redis.from_url(producer_env["REDIS_URL"])
    job_id = uuid.uuid4().hex
    client.hset(
        job_key(job_id),
        mapping={"id": job_id, "state": "failed", "failed_step": "link", "created_at": repr(time.time())},
    )
    client.zadd(DEAD_KEY, {job_id: time.time()})

    class TakenAtOnce:  # a worker that takes the message the moment it is published
        def apply_async(self) -> None:
            client.hset(job_key(job_id), "state", "linking")

    monkeypatch.setattr(dead_letters, "canvas_from", lambda *_: TakenAtOnce())
    with Uploads.from_env() as up:
        (job,) = dead_letters.DeadLetters(up).retry([job_id])
    assert job.state.value == "queued"
    assert client.hget(job_key(job_id), "state") == b"linking"  # the message did go out


def test_dead_letters_list_retry_and_purge_through_the_cli(fleet: Fleet, tmp_path: Path) -> None:
    task_id = str(uuid.uuid4())  # not in awork (yet)
    job = fleet.uploads.enqueue(random_file(tmp_path / "late-task.bin", 30_000), to=f"task:{task_id}")
    (failed,) = fleet.wait([job], timeout=60)
    assert failed.state.value == "failed"
    listing = cli(fleet, "dead", "list", "--json")
    assert listing.returncode == 0, listing.stderr
    mine = [json.loads(line) for line in listing.stdout.splitlines() if json.loads(line)["id"] == job.id]
    assert len(mine) == 1
    error = mine[0]["error"]
    assert error["code"] == "not-found" and error["status"] == 404 and error["step"] == "link"
    assert error["trace_id"] and error["description"]
    assert job.id in cli(fleet, "dead", "list").stdout  # the plain listing names it too
    # The task now exists: retry from the failed step, reusing the upload already made.
    fleet.sandbox.seed("tasks", task_id)
    retried = cli(fleet, "dead", "retry", job.id, "--json")
    assert retried.returncode == 0, retried.stderr
    assert json.loads(retried.stdout.splitlines()[0])["state"] == "queued"
    (done,) = fleet.wait([job], timeout=60)
    assert done.state.value == "done", done.error
    record = fleet.record(job.id)
    assert record["attempts_generate"] == "1" and record["attempts_put"] == "1"
    assert len(fleet.files_of(task_id)) == 1
    assert job.id not in cli(fleet, "dead", "list").stdout
    # --all, then purge
    other = str(uuid.uuid4())
    j2 = fleet.uploads.enqueue(random_file(tmp_path / "b.bin", 1000), to=f"task:{other}")
    j3 = fleet.uploads.enqueue(random_file(tmp_path / "c.bin", 1000), to=f"task:{uuid.uuid4()}")
    fleet.wait([j2, j3], timeout=60)
    fleet.sandbox.seed("tasks", other)
    assert cli(fleet, "dead", "retry", "--all").returncode == 0
    (d2, f3) = fleet.wait([j2, j3], timeout=60)
    assert d2.state.value == "done" and f3.state.value == "failed"
    staged = Path(fleet.env["STAGING_DIR"]) / j3.id
    assert staged.is_dir()
    keep = cli(fleet, "dead", "purge", "--older-than", "1h", "--json")
    assert json.loads(keep.stdout) == {"purged": 0}
    gone = cli(fleet, "dead", "purge", "--older-than", "0s", "--json")
    assert json.loads(gone.stdout)["purged"] >= 1
    assert not fleet.record(j3.id) and not staged.exists()
    assert cli(fleet, "dead", "purge").returncode == 2  # --older-than is required


def test_a_link_with_an_unknown_outcome_never_makes_a_second_file(fleet: Fleet, tmp_path: Path) -> None:
    # drop_after: awork links the file, then the connection drops (the worst case); 500_after the
    # same with an error; drop: nothing happens. With duplicate-on-relink on, every blind second
    # link would be a second file.
    before = fleet.sandbox.stats()["faults_injected"]
    fleet.sandbox.set_faults(
        {
            "duplicate_on_relink": True,
            "routes": {
                "link": {"drop_after": 0.35, "500_after": 0.15, "drop": 0.15},
                "multipart": {"drop_after": 0.35, "drop": 0.15},
            },
        }
    )
    tasks = [fleet.entity("tasks") for _ in range(6)]
    users = [fleet.entity("users") for _ in range(3)]
    cases = [(f"task:{t}", t, f"t{i}.bin") for i, t in enumerate(tasks)]
    cases += [(f"task:{tasks[0]}", tasks[0], "second-on-same-task.bin")]
    cases += [(f"user:{u}", u, f"u{i}.bin") for i, u in enumerate(users)]
    jobs = [
        fleet.uploads.enqueue(random_file(tmp_path / name, 10_000 + i * 777), to=to)
        for i, (to, _, name) in enumerate(cases)
    ]
    final = fleet.wait(jobs, timeout=120)
    stats = fleet.sandbox.stats()
    reconciled = 0
    for job, (to, entity, name) in zip(final, cases, strict=True):
        assert job.state.value == "done", (to, job.error)
        mine = [f for f in stats["files"] if f["entity_id"] == entity and f["name"] == name]
        assert len(mine) == 1, (to, name, mine)
        assert mine[0]["id"] == job.file_id
        record = fleet.record(job.id)
        reconciled += int(record.get("reconciled") or 0)
        if record.get("upload_id"):
            assert stats["links"][record["upload_id"]] == 1
    injected = {k: stats["faults_injected"][k] - before[k] for k in ("drop_after", "500_after", "drop")}
    assert injected["drop_after"] + injected["500_after"] >= 2, injected
    assert reconciled >= 2, "jobs whose link went through unanswered must have looked first"


def test_a_record_left_without_its_message_is_published_by_the_sweeper(
    fleet: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A producer that died between writing the record and publishing its message.
    monkeypatch.setattr(fleet.uploads, "_publish", lambda prepared: None)
    entity = fleet.entity("projects")
    job = fleet.uploads.enqueue(random_file(tmp_path / "orphan.bin", 5000), to=f"project:{entity}")
    monkeypatch.undo()
    assert fleet.record(job.id)["published"] == "0"
    (final,) = fleet.wait([job], timeout=60)
    assert final.state.value == "done", final.error
    record = fleet.record(job.id)
    assert record["redrive_reason"] == "unpublished" and record["published"] == "1"
    assert len(fleet.files_of(entity)) == 1


@pytest.mark.timing
def test_sigterm_lets_a_short_step_finish_and_hands_a_long_one_back(fleet: Fleet, tmp_path: Path) -> None:
    # A step that ends within the grace (5 s) finishes where it runs; the worker then exits.
    fleet.sandbox.set_faults({"routes": {"blob": {"latency_ms": 2000}}})
    entity = fleet.entity("tasks")
    short = fleet.uploads.enqueue(random_file(tmp_path / "short.bin", 5000), to=f"task:{entity}")
    wait_until(lambda: put_running(fleet, short.id), 30, "short put running")
    victim = holder_of(fleet, short.id)
    victim.signal(signal.SIGTERM)
    began = time.monotonic()
    assert victim.proc is not None
    assert victim.proc.wait(20) == 0
    assert time.monotonic() - began < 5 + 3
    record = fleet.record(short.id)
    assert record["attempts_put"] == "1" and record.get("uploaded_upload_id") == record["upload_id"]
    fleet.restart(victim)
    (done,) = fleet.wait([short], timeout=60)
    assert done.state.value == "done", done.error
    # A step still running when the grace ends goes back to the queue at once (not after the
    # visibility timeout, not via the sweeper) and does not count as a crash.
    fleet.sandbox.set_faults({"routes": {"blob": {"latency_ms": 60_000}}})
    entity2 = fleet.entity("tasks")
    long = fleet.uploads.enqueue(random_file(tmp_path / "long.bin", 5000), to=f"task:{entity2}")
    wait_until(lambda: put_running(fleet, long.id), 30, "long put running")
    fleet.wait_ready()
    victim = holder_of(fleet, long.id)
    # (its PUT keeps the 60 s it was given; the next one is quick)
    fleet.sandbox.set_faults({"routes": {"blob": {"latency_ms": 0}}})
    victim.signal(signal.SIGTERM)
    began = time.monotonic()
    assert victim.proc is not None
    assert victim.proc.wait(20) == 0
    took = time.monotonic() - began
    assert 4 < took < 5 + 3, took
    # (the other worker may have taken it up already: then `running` is its mark)
    assert "crashes_put" not in fleet.record(long.id)
    (final,) = fleet.wait([long], timeout=30)
    assert final.state.value == "done", final.error
    record = fleet.record(long.id)
    assert record["attempts_put"] == "2" and "crashes_put" not in record and "redrive_reason" not in record
    assert len(fleet.files_of(entity2)) == 1
    fleet.restart(victim)


def test_a_redis_restart_mid_batch_loses_no_job(fleet: Fleet, tmp_path: Path) -> None:
    assert fleet.redis is not None
    fleet.sandbox.set_faults({"routes": {"blob": {"latency_ms": 300}, "link": {"latency_ms": 100}}})
    entities = [fleet.entity("tasks") for _ in range(8)]
    cases = [(e, f"{n}-{i}.bin") for i, e in enumerate(entities) for n in ("a", "b")]
    jobs = [
        fleet.uploads.enqueue(random_file(tmp_path / name, 20_000 + i), to=f"task:{e}")
        for i, (e, name) in enumerate(cases)
    ]
    wait_until(
        lambda: sum(j.state.value == "done" for j in fleet.uploads.statuses([j.id for j in jobs])) >= 3,
        60,
        "a few jobs done",
    )
    fleet.redis.restart()  # SIGKILL, then start on the same AOF file
    final = fleet.wait(jobs, timeout=120)
    stats = fleet.sandbox.stats()
    for job, (entity, name) in zip(final, cases, strict=True):
        assert job.state.value == "done", (name, job.error)
        assert [f["name"] for f in stats["files"] if f["entity_id"] == entity].count(name) == 1
    assert all(w.alive() for w in fleet.workers), "workers reconnect by themselves"


def test_broker_settings_keep_late_acks_and_the_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWORK_SHUTDOWN_GRACE", raising=False)
    conf = celery_config("redis://127.0.0.1:1/0")
    assert conf["task_acks_late"] and conf["task_reject_on_worker_lost"]
    assert conf["worker_prefetch_multiplier"] == 1
    assert conf["worker_soft_shutdown_timeout"] == 60.0
    monkeypatch.setenv("AWORK_SHUTDOWN_GRACE", "12.5")
    assert celery_config("redis://127.0.0.1:1/0")["worker_soft_shutdown_timeout"] == 12.5


def test_kombu_guards_turn_closed_channel_errors_into_warnings() -> None:
    from kombu.message import Message
    from kombu.transport import redis as kombu_redis

    import workers.kombu_fixes  # noqa: F401  (installs the guards, as the worker app does)

    class ClosedChannel:
        no_ack_consumers = None

        def basic_ack(self, *a: Any, **k: Any) -> None:
            raise AttributeError("'NoneType' object has no attribute 'client'")

        def basic_reject(self, *a: Any, **k: Any) -> None:
            raise AttributeError("'NoneType' object has no attribute 'client'")

    message = Message(body=b"{}", delivery_tag="tag-1", channel=ClosedChannel())
    message.ack_log_error(None, ())  # would raise without the guard (and stop the worker)
    rejected = Message(body=b"{}", delivery_tag="tag-2", channel=ClosedChannel())
    rejected.reject_log_error(None, (), requeue=True)

    class Gone:
        def conn_or_acquire(self, client: Any = None) -> Any:
            raise AttributeError("'NoneType' object has no attribute 'hostname'")

    qos = kombu_redis.QoS.__new__(kombu_redis.QoS)
    qos.channel = Gone()
    qos._delivered = {"tag-3": object()}  # type: ignore[assignment]
    assert kombu_redis.QoS.restore_unacked(qos) is None


def test_an_idle_sweeper_costs_a_redis_call_a_pass(redis_url: str) -> None:
    """With no unfinished job, no message in a worker's hands and nothing to announce, a pass is
    one EXISTS: at the default 15 s interval, four Redis calls a minute."""
    client = redis.Redis.from_url(redis_url)
    sweeper = Sweeper(client, redis_url, timings=SweeperTimings(interval=0.05))

    def calls() -> int:
        return sum(n for name, n in command_calls(client).items() if name != "info")

    before = calls()
    for _ in range(20):
        sweeper.pass_once()
    assert calls() - before == 20
    client.zadd(ACTIVE_KEY, {"0" * 32: time.time()})  # a job to look at: a full pass
    before = calls()
    sweeper.pass_once()
    assert calls() - before > 3
    client.close()
