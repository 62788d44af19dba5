"""Canceling from Python (`Uploads.cancel`) and the shell (`awork-uploads cancel`)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import redis

from producers.cancel import CancelRefused
from producers.cli import main as cli_main
from producers.client import JobNotFound, Uploads
from producers.contract import JobState
from producers.keys import job_key


def test_cancel_from_python_and_the_cli(
    producer_env: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "a.txt"
    src.write_bytes(b"hello")
    client = redis.Redis.from_url(producer_env["REDIS_URL"], decode_responses=True)
    with Uploads.from_env() as up:
        a, b, c = (up.enqueue(src, to=f"task:{uuid.uuid4()}") for _ in range(3))
        (canceled,) = up.cancel([a.id])
        assert canceled.state is JobState.CANCELED and canceled.finished
        assert not (Path(producer_env["STAGING_DIR"]) / a.id).exists()
        client.hset(job_key(b.id), "file_id", "f-1")
        with pytest.raises(CancelRefused, match="linked"):
            up.cancel([b.id])
        with pytest.raises(JobNotFound):
            up.cancel([uuid.uuid4().hex])
        assert up.jobs(state="canceled")[0].id == a.id
    assert cli_main(["cancel", c.id, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "canceled"
    assert cli_main(["cancel", b.id]) == 1
    assert "cannot be canceled" in capsys.readouterr().err
    assert cli_main(["cancel", "../etc"]) == 2
    client.close()
