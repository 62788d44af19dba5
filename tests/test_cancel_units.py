"""The cancel script without a fleet: every step's lock and hand-over mark count, and the
canceled job's event goes out on the events channel."""

from __future__ import annotations

import fakeredis
import pytest

from producers.cancel import cancel_script
from producers.contract import STEP_TASKS, JobState
from producers.keys import EVENTS_CHANNEL, job_key, step_lock_key

JOB = "0123456789abcdef0123456789abcdef"


def _client() -> fakeredis.FakeRedis:
    client = fakeredis.FakeRedis()
    client.hset(job_key(JOB), mapping={"id": JOB, "state": JobState.UPLOADING.value})
    return client


@pytest.mark.parametrize("step", list(STEP_TASKS))
def test_a_running_step_of_any_kind_turns_a_cancel_into_a_request(step: str) -> None:
    client = _client()
    client.set(step_lock_key(JOB, step), "token")
    assert cancel_script(client, JOB, 3600).outcome == "requested"
    assert client.hget(job_key(JOB), "cancel_requested") == b"1"
    assert client.hget(job_key(JOB), "state") == JobState.UPLOADING.value.encode()


@pytest.mark.parametrize("mark", ["multipart_sent", "version_sent", "byurl_sent"])
def test_a_job_whose_bytes_went_to_awork_is_not_canceled(mark: str) -> None:
    client = _client()
    client.hset(job_key(JOB), mark, "1")
    assert cancel_script(client, JOB, 3600).outcome == "linked"
    assert client.hget(job_key(JOB), "state") == JobState.UPLOADING.value.encode()


def test_a_cancel_is_announced_on_the_events_channel() -> None:
    client = _client()
    events = client.pubsub()
    events.subscribe(EVENTS_CHANNEL)
    assert events.get_message(timeout=1)["type"] == "subscribe"
    assert cancel_script(client, JOB, 3600).outcome == "canceled"
    message = events.get_message(timeout=1)
    assert message is not None and message["channel"] == EVENTS_CHANNEL.encode()
    assert message["data"] == f'{{"id":"{JOB}","state":"canceled"}}'.encode()
    assert 0 < client.ttl(job_key(JOB)) <= 3600
