"""The typed job record: decoding a Redis hash (bytes or str), encoding one, and records that
anyone with Redis access could have written."""

from __future__ import annotations

import dataclasses
import logging

import fakeredis
import pytest

from producers.contract import STEP_TASKS, JobState
from producers.job_record import Field, JobRecord, RecordError, read, step_field
from producers.keys import INDEX_KEY, job_key
from producers.listing import list_jobs
from producers.records import Job, JobStore

JOB = "0123456789abcdef0123456789abcdef"
OTHER = "fedcba9876543210fedcba9876543210"

# A record as the producer and the steps write it (a failed link after one retry).
RECORD = {
    "id": JOB,
    "state": "dead",
    "workspace": "acme",
    "target": f"task:{OTHER}",
    "target_kind": "task",
    "entity": "tasks",
    "entity_id": OTHER,
    "route": "task",
    "file_name": "report.pdf",
    "description": "",
    "content_type": "application/pdf",
    "size": "2048",
    "source_kind": "file",
    "source": "/var/staging/x/report.pdf",
    "staged_owned": "1",
    "source_md5": "",
    "idempotency_key": "",
    "priority": "high",
    "bytes_sent": "2048",
    "published": "1",
    "created_at": "1700000000.25",
    "updated_at": "1700000100.5",
    "on_existing": "new",
    "new_version_of": "",
    "via": "workers",
    "flow": "upload",
    "notify": "1",
    "callback_url": "https://hooks.example.com/x",
    "upload_id": "u-1",
    "upload_url": "https://blob.example/c/b?sig=secret",
    "upload_url_expires": "1700003600.0",
    "attempts_generate": "1",
    "attempts_put": "1",
    "attempts_link": "2",
    "errors_link": "2",
    "crashes_put": "1",
    "error_step": "link",
    "error_code": "server-error",
    "error_description": "HTTP 503",
    "error_status": "503",
    "error_trace_id": "t-9",
    "finished_at": "1700000100.5",
    "rate_waits": "3",
}


def test_field_names_the_fields_of_the_dataclass() -> None:
    names = {f.name for f in dataclasses.fields(JobRecord)} - {"attempts", "errors", "crashes"}
    assert names == {f.value for f in Field}


def test_decode_types_every_field_from_bytes_or_str() -> None:
    as_bytes = {k.encode(): v.encode() for k, v in RECORD.items()}
    for raw in (RECORD, as_bytes):
        rec = JobRecord.decode(raw, JOB)
        assert rec.state is JobState.DEAD and rec.finished
        assert (rec.size, rec.bytes_sent, rec.error_status) == (2048, 2048, 503)
        assert rec.created_at == 1700000000.25 and rec.wait_until is None
        assert rec.staged_owned and rec.notify and rec.published and not rec.cancel_requested
        assert rec.description is None  # "" is no value
        assert rec.attempts == {"generate": 1, "put": 1, "link": 2}
        assert rec.errors == {"link": 2} and rec.crashes == {"put": 1}
        assert rec.rate_waits == 3 and rec.redrives == 0
        assert "secret" not in repr(rec)  # the upload URL is a write credential


def test_the_public_view_matches_the_one_read_from_the_hash() -> None:
    assert JobRecord.decode(RECORD, JOB).job() == Job.from_record(RECORD)
    assert JobRecord.decode(RECORD, JOB).job(created=False) == Job.from_record(RECORD, created=False)


def test_encode_writes_the_forms_the_workers_write() -> None:
    rec = JobRecord.decode(RECORD, JOB)
    encoded = rec.encode()
    # every non-empty field comes back as it was written
    assert {k: v for k, v in RECORD.items() if v} == {k: v for k, v in encoded.items() if k in RECORD}
    assert JobRecord.decode(encoded, JOB) == rec
    assert encoded[Field.CANCEL_REQUESTED] == "0" and Field.WAIT_UNTIL not in encoded
    assert encoded[step_field("attempts", "link")] == "2"
    rec.wait_until = 1700000200.125
    assert JobRecord.decode(rec.encode(), JOB).wait_until == 1700000200.125


def test_a_record_round_trips_through_redis() -> None:
    client = fakeredis.FakeRedis()
    client.hset(job_key(JOB), mapping=JobRecord.decode(RECORD, JOB).encode())
    rec = JobRecord.decode(client.hgetall(job_key(JOB)), JOB)
    assert rec == JobRecord.decode(JobStore(client).get(JOB) or {}, JOB)
    assert rec.upload_url == RECORD["upload_url"]


def test_unknown_fields_are_ignored() -> None:
    raw = {**RECORD, "evil": "x" * 1000, "attempts_nosuchstep": "oops", "__class__": "1", "": ""}
    rec = JobRecord.decode(raw, JOB)
    assert rec == JobRecord.decode(RECORD, JOB)
    assert "evil" not in rec.encode() and "attempts_nosuchstep" not in rec.encode()


@pytest.mark.parametrize(
    ("change", "field", "problem"),
    [
        ({"id": None}, "id", "missing"),
        ({"id": OTHER}, "id", "names another job"),
        ({"state": "exploded"}, "state", "expected JobState"),
        ({"size": "12 bytes"}, "size", "expected int"),
        ({"size": "1.5"}, "size", "expected int"),
        ({"created_at": "nan"}, "created_at", "expected float"),
        ({"staged_owned": "yes"}, "staged_owned", "expected bool"),
        ({"attempts_put": "many"}, "attempts_put", "expected int"),
    ],
)
def test_a_field_that_does_not_parse_is_refused_by_name(
    change: dict[str, str | None], field: str, problem: str
) -> None:
    raw = {k: v for k, v in {**RECORD, **change}.items() if v is not None}
    with pytest.raises(RecordError, match=f"record field {field}: {problem}") as caught:
        JobRecord.decode(raw, JOB)
    assert caught.value.field == field


def test_bytes_that_are_not_utf8_are_refused() -> None:
    with pytest.raises(RecordError, match="not UTF-8"):
        JobRecord.decode({b"id": JOB.encode(), b"file_name": b"\xff\xfe"}, JOB)


def test_step_fields_exist_for_every_step_only() -> None:
    assert [step_field("errors", s) for s in STEP_TASKS][:2] == ["errors_generate", "errors_put"]
    with pytest.raises(ValueError):
        step_field("attempts", "nosuchstep")


def test_read_skips_what_does_not_parse(caplog: pytest.LogCaptureFixture) -> None:
    assert read(JOB, None) is None and read(JOB, {}) is None
    with caplog.at_level(logging.WARNING):
        assert read(JOB, {**RECORD, "size": "-"}) is None
    assert "record field size" in caplog.text


def test_a_listing_skips_a_record_without_an_id() -> None:
    """A hash without `id` (a late write after the record expired re-creates a partial hash)
    used to stop the whole listing with a KeyError."""
    client = fakeredis.FakeRedis()
    store = JobStore(client)
    client.hset(job_key(JOB), mapping=RECORD)
    client.hset(job_key(OTHER), mapping={"updated_at": "1700000200.0", "bytes_sent": "10"})
    client.zadd(INDEX_KEY, {JOB: 1.0, OTHER: 2.0})
    page = list_jobs(client, store)
    assert [j.id for j in page.jobs] == [JOB]
    assert [j.id for j in list_jobs(client, store, state="dead", workspaces={"acme"}).jobs] == [JOB]
    assert list_jobs(client, store, state="queued").jobs == []
