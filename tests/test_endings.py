"""Job ends are announced once per callback: the batch counter goes down once per job, the last
job announces the batch, and the sweeper announces what a dead process left behind."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import redis

from producers.canvas import publisher_app
from producers.contract import QUEUE_CALLBACKS, JobState
from producers.endings import STALE_SECONDS, announce, batch_key
from producers.keys import ENDED_KEY, job_key
from producers.records import JobStore


def _messages(client: redis.Redis) -> list[dict[str, Any]]:
    import base64

    out = []
    for raw in client.lrange(QUEUE_CALLBACKS, 0, -1):
        envelope = json.loads(raw)
        out.append(json.loads(base64.b64decode(envelope["body"]))[1])
    return out


def _job(client: redis.Redis, batch_id: str, callback: bool) -> str:
    job_id = uuid.uuid4().hex
    client.hset(
        job_key(job_id),
        mapping={
            "id": job_id,
            "state": "uploading",
            "workspace": "default",
            "notify": "1",
            "batch_id": batch_id,
            "callback_url": "https://hooks.example.com/x" if callback else "",
        },
    )
    return job_id


def test_batch_counts_down_once_per_job_and_announces_on_the_last(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    app = publisher_app(redis_url)
    store = JobStore(client)
    batch_id = uuid.uuid4().hex
    jobs = [_job(client, batch_id, callback=(i == 0)) for i in range(3)]
    client.hset(
        batch_key(batch_id), mapping={"open": 3, "total": 3, "callback_url": "https://hooks.example.com/b"}
    )
    try:
        for job_id in jobs[:2]:
            store.finish(job_id, JobState.DONE, notify=True)
            assert announce(client, app, [job_id]) == (1 if job_id == jobs[0] else 0)
            assert announce(client, app, [job_id]) == 0  # asked again: announced already
        assert int(client.hget(batch_key(batch_id), "open")) == 1
        store.finish(jobs[2], JobState.CANCELED, notify=True)
        assert announce(client, app, [jobs[2]]) == 1
        assert int(client.hget(batch_key(batch_id), "open")) == 0
        kinds = [(m["kind"], m["id"]) for m in _messages(client)]
        assert sorted(kinds) == sorted([("job", jobs[0]), ("batch", batch_id)])
        # a crash between the messages and leaving ENDED announces again, with the same event id
        client.zadd(ENDED_KEY, {jobs[0]: time.time()})
        assert announce(client, app, [jobs[0]]) == 1
        events = [m["event_id"] for m in _messages(client) if m["kind"] == "job"]
        assert len(events) == 2 and len(set(events)) == 1
        assert client.zcard(ENDED_KEY) == 0
    finally:
        app.close()
        client.close()


def test_the_sweeper_announces_ends_left_behind(redis_url: str) -> None:
    from workers.sweeper import Sweeper

    client = redis.Redis.from_url(redis_url)
    job_id = _job(client, "", callback=True)
    JobStore(client).finish(job_id, JobState.FAILED, notify=True)  # and the process died here
    sweeper = Sweeper(client, redis_url)
    try:
        assert sweeper.sweep_once().announced == 0  # too fresh: its own process may still announce
        result = sweeper.sweep_once(now=time.time() + STALE_SECONDS + 1)
        assert result.announced == 1
        assert [(m["kind"], m["id"]) for m in _messages(client)] == [("job", job_id)]
        assert client.zcard(ENDED_KEY) == 0
    finally:
        sweeper.app.close()
        client.close()
