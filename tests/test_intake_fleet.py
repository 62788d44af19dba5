"""The intake with a real fleet: streamed uploads that land, signed callbacks (with retries and
a batch callback), cancel of a running transfer, and a client that is not Python."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ops.demo_files import random_file
from ops.redis_server import free_port
from producers.config import SharedSettings
from tests.fleet import FAST, Fleet, wait_until
from tests.intake_util import SECRETS_KEY, Intake, Receiver, make_token, running_intake, verify_signature

pytestmark = pytest.mark.slow
NODE_CLIENT = Path(__file__).with_name("intake_client.mjs")
# Callback receivers listen on ports chosen now, so both sides' AWORK_CALLBACK_HOSTS can list them.
PORTS = [free_port() for _ in range(4)]
CALLBACK_HOSTS = ",".join(f"127.0.0.1:{p}" for p in PORTS)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    env = {
        **FAST,
        "AWORK_SECRETS_KEY": SECRETS_KEY,
        "AWORK_CALLBACK_HOSTS": CALLBACK_HOSTS,
        "AWORK_CALLBACK_RETRY_BASE": "0.2",
        "AWORK_SINGLE_PUT_THRESHOLD": str(64 * 1024),
        "AWORK_BLOCK_SIZE": str(64 * 1024),
        "AWORK_PARALLEL_BLOCKS": "1",
    }
    f = Fleet(tmp_path_factory.mktemp("intake-fleet"), worker_count=1, extra_env=env).start()
    yield f
    f.stop()


@pytest.fixture(scope="module")
def receivers() -> Iterator[list[Receiver]]:
    made: list[Receiver] = []
    yield made
    for r in made:
        r.close()


@pytest.fixture(scope="module")
def intake(fleet: Fleet, receivers: list[Receiver]) -> Iterator[Intake]:
    saved = dict(os.environ)
    os.environ.update({k: fleet.env[k] for k in ("REDIS_URL", "STAGING_DIR", "AWORK_WORKSPACES_FILE")})
    for name in ("AWORK_SINGLE_PUT_THRESHOLD", "AWORK_BLOCK_SIZE", "AWORK_CALLBACK_HOSTS"):
        os.environ[name] = fleet.env[name]
    try:
        shared = SharedSettings.from_env()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    with running_intake(shared) as running:
        yield running


@pytest.fixture(scope="module")
def token(fleet: Fleet) -> tuple[str, str]:
    made = make_token(fleet.env["REDIS_URL"], ["default"])
    return made.token, made.callback_secret


def _receiver(fleet: Fleet, intake: Intake, receivers: list[Receiver], fail_first: int = 0) -> Receiver:
    r = Receiver(PORTS[len(receivers)], fail_first=fail_first)
    receivers.append(r)
    return r


def test_streamed_upload_lands_and_the_signed_callback_is_retried_until_delivered(
    fleet: Fleet, intake: Intake, token: tuple[str, str], receivers: list[Receiver], tmp_path: Path
) -> None:
    bearer, secret = token
    receiver = _receiver(fleet, intake, receivers, fail_first=3)
    entity = fleet.entity("tasks")
    data = random_file(tmp_path / "report.bin", 200_000).read_bytes()
    resp = httpx.post(
        f"{intake.url}/v1/jobs",
        params={"to": f"task:{entity}", "name": "report.bin", "callback_url": receiver.url("/hooks?k=1")},
        headers={"Authorization": f"Bearer {bearer}", "Content-Type": "application/octet-stream"},
        content=data,
        timeout=30,
    )
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["id"]
    wait_until(lambda: receiver.delivered(), 60, "the callback delivered")
    assert len(receiver.received) == 4  # three 500s, then delivered
    assert len({h["webhook-id"] for h, _, _ in receiver.received}) == 1  # one event id throughout
    headers, event = receiver.delivered()[0]
    body = next(b for h, b, s in receiver.received if s < 300)
    assert verify_signature(secret, headers, body)
    assert not verify_signature("whsec_" + "A" * 44, headers, body)
    assert "authorization" not in headers
    assert event["type"] == "job.done" and event["data"]["id"] == job_id
    (awork_file,) = fleet.files_of(entity)
    assert awork_file["size"] == len(data) and awork_file["id"] == event["data"]["file_id"]
    record = fleet.record(job_id)
    assert record["callback_state"] == "delivered" and record["callback_attempts"] == "4"


def test_batch_callback_when_the_last_job_ends(
    fleet: Fleet, intake: Intake, token: tuple[str, str], receivers: list[Receiver]
) -> None:
    bearer, secret = token
    receiver = _receiver(fleet, intake, receivers)
    staging = Path(fleet.env["STAGING_DIR"]) / "inbox-batch"
    staging.mkdir(exist_ok=True)
    jobs = []
    for i in range(3):
        (staging / f"{i}.txt").write_bytes(os.urandom(1000))
        jobs.append({"to": f"task:{fleet.entity('tasks')}", "staged_path": f"inbox-batch/{i}.txt"})
    jobs.append({"to": f"task:{uuid.uuid4()}", "staged_path": "inbox-batch/0.txt"})  # an unknown task: fails
    resp = httpx.post(
        f"{intake.url}/v1/batches",
        json={"jobs": jobs, "callback_url": receiver.url()},
        headers={"Authorization": f"Bearer {bearer}"},
    )
    assert resp.status_code == 202, resp.text
    batch_id = resp.json()["id"]
    wait_until(lambda: receiver.delivered(), 60, "the batch callback")
    time.sleep(1.0)
    delivered = receiver.delivered()
    assert len(delivered) == 1, delivered  # one callback for the batch, none per job
    headers, event = delivered[0]
    assert verify_signature(secret, headers, receiver.received[0][1])
    assert event["type"] == "batch.ended" and event["data"]["id"] == batch_id
    assert event["data"]["open"] == 0 and event["data"]["counts"] == {"done": 3, "failed": 1}


def test_cancel_stops_a_running_transfer_at_its_next_block(
    fleet: Fleet, intake: Intake, token: tuple[str, str], receivers: list[Receiver], tmp_path: Path
) -> None:
    bearer, _ = token
    receiver = _receiver(fleet, intake, receivers)
    fleet.sandbox.set_faults({"routes": {"blob": {"latency_ms": 150}}})
    try:
        entity = fleet.entity("tasks")
        auth = {"Authorization": f"Bearer {bearer}"}
        resp = httpx.post(
            f"{intake.url}/v1/jobs",
            params={"to": f"task:{entity}", "name": "slow.bin", "callback_url": receiver.url()},
            headers={**auth, "Content-Type": "application/octet-stream"},
            content=os.urandom(64 * 1024 * 60),  # 60 blocks at 150 ms each
        )
        job_id = resp.json()["id"]
        wait_until(lambda: int(fleet.record(job_id).get("bytes_sent") or 0) > 0, 30, "the transfer under way")
        resp = httpx.post(f"{intake.url}/v1/jobs/{job_id}/cancel", headers=auth)
        assert resp.status_code == 202 and resp.json()["cancel_requested"] is True
        wait_until(lambda: fleet.record(job_id).get("state") == "canceled", 20, "the transfer stopped")
        record = fleet.record(job_id)
        assert int(record["bytes_sent"]) < 64 * 1024 * 60
        assert not (Path(fleet.env["STAGING_DIR"]) / job_id).exists()
        wait_until(lambda: receiver.delivered(), 30, "the canceled job's callback")
        assert receiver.delivered()[0][1]["type"] == "job.canceled"
        time.sleep(2)
        assert fleet.files_of(entity) == []  # nothing linked
    finally:
        fleet.sandbox.set_faults({"routes": {"blob": {"latency_ms": 0}}})


def test_a_node_client_streams_a_file_and_verifies_the_signed_callback(
    fleet: Fleet, intake: Intake, token: tuple[str, str], tmp_path: Path
) -> None:
    """Node's own fetch and crypto: no Python on the client side."""
    bearer, secret = token
    entity = fleet.entity("tasks")
    src = random_file(tmp_path / "from-node.bin", 300_000)
    proc = subprocess.Popen(
        ["node", str(NODE_CLIENT), intake.url, bearer, secret, f"task:{entity}", str(src), str(PORTS[-1])],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, (out, err)
    result = json.loads(out.strip().splitlines()[-1])
    assert result["verified"] is True and result["type"] == "job.done"
    assert fleet.files_of(entity)[0]["id"] == result["file_id"]


def test_on_done_sends_a_task_of_the_producers_own_app(fleet: Fleet, tmp_path: Path) -> None:
    """Python producers: `on_done` names a Celery task of their app; it gets the job as argument."""
    import base64

    entity = fleet.entity("tasks")
    src = random_file(tmp_path / "done.bin", 1000)
    job = fleet.uploads.enqueue(src, to=f"task:{entity}", on_done="myapp.tasks.uploaded@myapp")
    (final,) = fleet.wait([job], timeout=60)
    assert final.state.value == "done", final.error
    client = fleet.client()
    wait_until(lambda: client.llen("myapp") == 1, 30, "the on_done task message")
    envelope = json.loads(client.lrange("myapp", 0, -1)[0])
    client.close()
    assert envelope["headers"]["task"] == "myapp.tasks.uploaded"
    args, _kwargs, _ = json.loads(base64.b64decode(envelope["body"]))
    assert args[0]["id"] == job.id and args[0]["state"] == "done" and args[0]["file_id"] == final.file_id
