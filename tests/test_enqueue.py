"""Producers against a real redis-server: records, messages, staging, idempotency, bad input."""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from pathlib import Path

import pytest
import redis

from producers.cli import main as cli_main
from producers.client import RedisUnavailable, Uploads
from producers.config import SharedSettings
from producers.contract import SpecError
from producers.prepare import Prepared
from producers.spec import JobSpec
from workers.queue_metrics import BrokerLayout

# fixed, not random: it appears in test ids, which pytest-xdist needs equal in every process
ID = str(uuid.uuid5(uuid.NAMESPACE_URL, __name__))


def _messages(url: str, queue: str) -> list[dict]:
    """Every message waiting in `queue`, in all of kombu's priority lists."""
    client = redis.Redis.from_url(url)
    out = []
    for key in BrokerLayout().list_keys(queue):
        for raw in client.lrange(key, 0, -1):
            envelope = json.loads(raw)
            body = json.loads(base64.b64decode(envelope["body"]))
            out.append(
                {"headers": envelope["headers"], "body": body, "priority": envelope["properties"]["priority"]}
            )
    return out


@pytest.fixture
def up(producer_env: dict[str, str]) -> Uploads:
    uploads = Uploads.from_env()
    yield uploads
    uploads.close()


def test_enqueue_writes_record_stages_and_publishes_the_canvas(
    up: Uploads, producer_env: dict[str, str], tmp_path: Path
) -> None:
    src = tmp_path / "report.pdf"
    src.write_bytes(b"%PDF-1.7 hello")
    job = up.enqueue(src, to=f"task:{ID}", description="Q3")
    assert job.state.value == "queued" and job.created
    record = up.store.get(job.id)
    assert record is not None
    assert record["published"] == "1"
    staged = Path(record["source"])
    assert staged.read_bytes() == src.read_bytes()
    # hashed while copied: the worker sends it as Content-MD5 and the upload host checks it
    assert record["source_md5"] == base64.b64encode(hashlib.md5(src.read_bytes()).digest()).decode()
    assert staged.parent == Path(producer_env["STAGING_DIR"]) / job.id
    msgs = _messages(producer_env["REDIS_URL"], "awork.api")
    assert len(msgs) == 1
    headers, (args, kwargs, embed) = msgs[0]["headers"], msgs[0]["body"]
    assert headers["task"] == "awork.generate_upload_url"
    assert args == [] and kwargs == {
        "job_id": job.id,
        "workspace": "default",
        "target": f"task:{ID}",
        "file_name": "report.pdf",
    }
    chained = [s["task"] for s in embed["chain"]]
    assert chained == ["awork.link_file", "awork.put_file"]  # Celery stores the rest reversed
    assert all(s["immutable"] for s in embed["chain"])


def test_priority_is_recorded_and_ranks_every_step_of_the_job(
    up: Uploads, producer_env: dict[str, str], tmp_path: Path
) -> None:
    src = tmp_path / "p.txt"
    src.write_text("p")
    jobs = {p: up.enqueue(src, to=f"task:{ID}", priority=p) for p in ("bulk", "normal", "high")}
    assert {p: up.status(j.id).priority for p, j in jobs.items()} == {
        "bulk": "bulk",
        "normal": "normal",
        "high": "high",
    }
    msgs = {m["body"][1]["job_id"]: m for m in _messages(producer_env["REDIS_URL"], "awork.api")}
    # kombu's Redis transport reads priority 0 first: high before normal before bulk
    got = {p: msgs[j.id]["priority"] for p, j in jobs.items()}
    assert got["high"] < got["normal"] < got["bulk"]
    # the put that follows sits one step below every API step of the same job priority
    for p, j in jobs.items():
        (put,) = [s for s in msgs[j.id]["body"][2]["chain"] if s["task"] == "awork.put_file"]
        assert put["options"]["priority"] == got[p] + 3
        assert put["options"]["queue"] == "awork.transfer"
    with pytest.raises(SpecError, match=r"^priority: expected one of high, normal, bulk, got 'urgent'"):
        up.enqueue(src, to=f"task:{ID}", priority="urgent")


def test_multipart_targets_publish_one_step(
    up: Uploads, producer_env: dict[str, str], tmp_path: Path
) -> None:
    src = tmp_path / "c.txt"
    src.write_text("contract")
    up.enqueue(src, to=f"company:{ID}")
    msgs = _messages(producer_env["REDIS_URL"], "awork.transfer")
    assert [m["headers"]["task"] for m in msgs] == ["awork.multipart_upload"]


def test_file_already_in_staging_is_referenced_not_copied(up: Uploads, producer_env: dict[str, str]) -> None:
    inside = Path(producer_env["STAGING_DIR"]) / "incoming" / "x.bin"
    inside.parent.mkdir()
    inside.write_bytes(b"x" * 10)
    job = up.enqueue(inside, to=f"task:{ID}")
    record = up.store.get(job.id)
    assert record is not None
    assert record["source"] == str(inside.resolve()) and record["staged_owned"] == "0"


def test_idempotency_key_returns_the_same_job(
    up: Uploads, producer_env: dict[str, str], tmp_path: Path
) -> None:
    src = tmp_path / "a.txt"
    src.write_text("a")
    first = up.enqueue(src, to=f"task:{ID}", idempotency_key="order-1")
    second = up.enqueue(src, to=f"task:{ID}", idempotency_key="order-1")
    assert second.id == first.id and not second.created
    assert len(_messages(producer_env["REDIS_URL"], "awork.api")) == 1
    assert len(list(Path(producer_env["STAGING_DIR"]).iterdir())) == 1
    other_ws = up.enqueue_many([JobSpec(src, f"task:{ID}", idempotency_key="order-2")])
    assert other_ws[0].id != first.id


def test_bulk_enqueue_and_bad_spec_enqueues_nothing(
    up: Uploads, producer_env: dict[str, str], tmp_path: Path
) -> None:
    files = []
    for i in range(20):
        f = tmp_path / f"f{i}.txt"
        f.write_text(str(i))
        files.append(f)
    bad = [JobSpec(f, f"task:{ID}") for f in files] + [JobSpec(tmp_path / "missing", f"task:{ID}")]
    with pytest.raises(SpecError, match=r"^path: .*no such file"):
        up.enqueue_many(bad)
    assert _messages(producer_env["REDIS_URL"], "awork.api") == []
    assert up.store.list_ids() == []
    assert list(Path(producer_env["STAGING_DIR"]).iterdir()) == []
    jobs = up.enqueue_many([JobSpec(f, f"task:{ID}") for f in files])
    assert len({j.id for j in jobs}) == 20
    assert len(_messages(producer_env["REDIS_URL"], "awork.api")) == 20


def test_publishing_a_batch_does_not_compare_its_jobs_pairwise(
    up: Uploads, producer_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sorting a batch into Celery-published and pre-built messages is one pass: comparing every
    job with every other took tens of seconds for 10,000 jobs of a recurring flow."""
    compared = 0
    plain_eq = Prepared.__eq__

    def counting_eq(self: Prepared, other: object) -> bool:
        nonlocal compared
        compared += 1
        return plain_eq(self, other)

    monkeypatch.setattr(Prepared, "__eq__", counting_eq)
    n = 200
    specs = [JobSpec(b"v", f"task:{ID}", name=f"f{i}.txt", on_existing="version") for i in range(n)]
    specs += [JobSpec(b"p", f"task:{ID}", name=f"p{i}.txt") for i in range(n)]
    jobs = up.enqueue_many(specs)
    assert len({j.id for j in jobs}) == 2 * n
    assert len(_messages(producer_env["REDIS_URL"], "awork.api")) == 2 * n
    assert compared <= 2 * n, f"{compared} comparisons between the {2 * n} jobs of one batch"


def test_unknown_workspace(up: Uploads, tmp_path: Path) -> None:
    src = tmp_path / "a.txt"
    src.write_text("a")
    with pytest.raises(SpecError, match=r"^workspace: unknown workspace 'acme'"):
        up.enqueue(src, to=f"task:{ID}", workspace="acme")
    up.redis.sadd("awork:workspaces", "acme")  # a worker that serves acme announced itself
    assert up.enqueue(src, to=f"task:{ID}", workspace="acme").workspace == "acme"


def test_workspaces_file_lists_the_names(
    up: Uploads, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wf = tmp_path / "workspaces.toml"
    wf.write_text('[workspaces.acme]\napi_key_env = "ACME_KEY"\nplan = "enterprise"\n')
    monkeypatch.setenv("AWORK_WORKSPACES_FILE", str(wf))
    with Uploads.from_env() as up2:
        assert up2.known_workspaces() == {"acme"}


def test_redis_unreachable_names_the_url_without_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ops.redis_server import free_port

    monkeypatch.setenv("REDIS_URL", f"redis://:hunter2@127.0.0.1:{free_port()}/0")
    monkeypatch.setenv("STAGING_DIR", str(tmp_path / "staging"))
    src = tmp_path / "a.txt"
    src.write_text("a")
    up = Uploads(SharedSettings.from_env(), redis_retry_seconds=0.5)
    with pytest.raises(RedisUnavailable) as info:
        up.enqueue(src, to=f"task:{ID}")
    assert "hunter2" not in str(info.value)
    assert "redis://:***@127.0.0.1" in str(info.value)
    assert not (tmp_path / "staging").exists() or list((tmp_path / "staging").iterdir()) == []


def test_cli_bad_input_is_one_line_naming_the_field(
    producer_env: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "a.txt"
    src.write_text("a")
    cases = [
        (["enqueue", str(tmp_path / "nope"), "--to", f"task:{ID}"], "path: "),
        (["enqueue", str(tmp_path), "--to", f"task:{ID}"], "is a directory"),
        (["enqueue", str(src), "--to", f"widget:{ID}"], "to: unknown target kind 'widget'"),
        (["enqueue", str(src), "--to", "task:42"], "to: malformed id '42'"),
        (["enqueue", str(src), "--to", f"image:projects/{ID}"], "path: a.txt: not an image"),
        (["enqueue", str(src), "--to", f"task:{ID}", "--workspace", "zzz"], "workspace: unknown workspace"),
    ]
    for argv, fragment in cases:
        assert cli_main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and fragment in err, err
    assert _messages(producer_env["REDIS_URL"], "awork.api") == []


def test_cli_enqueue_json_and_status(
    producer_env: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "a.txt"
    src.write_text("a")
    assert cli_main(["enqueue", str(src), "--to", f"task:{ID}", "--json"]) == 0
    line = json.loads(capsys.readouterr().out.strip())
    assert line["state"] == "queued" and line["file_id"] is None and line["error"] is None
    assert cli_main(["status", line["id"], "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["id"] == line["id"]
    assert cli_main(["jobs", "--state", "queued", "--json"]) == 0
    assert [json.loads(x)["id"] for x in capsys.readouterr().out.splitlines()] == [line["id"]]
    assert cli_main(["status", "0" * 32]) == 1
