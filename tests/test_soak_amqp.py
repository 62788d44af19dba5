"""The fault soak (ops/soak) with RabbitMQ quorum queues as the broker: `python -m ops.soak.amqp`.

A shorter run than tests/test_soak.py (200 jobs, a worker SIGKILLed every ~8 s, one SIGKILL and
restart of the state Redis) against the machine's RabbitMQ, in a vhost of its own; skipped
where there is none. Checks the verdict line and the exit status, as tests/test_soak.py does.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ops.rabbitmq import reachable
from ops.soak.run import LAST_LINE

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not reachable(), reason="no RabbitMQ on 127.0.0.1:5672")]

@pytest.mark.timeout(400)
def test_short_soak_on_rabbitmq_passes() -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AWORK_", "REDIS_URL", "STAGING_DIR", "BROKER_URL"))
    }
    argv = [sys.executable, "-m", "ops.soak.amqp", "--jobs", "200", "--seed", "20241", "--kill-every", "8",
            "--timeout", "300"]  # fmt: skip
    proc = subprocess.run(
        argv, cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=360
    )
    out = proc.stdout.strip().splitlines()
    assert out, proc.stderr[-3000:]
    tail = "\n".join(out[-40:])
    assert "quorum queues" in out[0], tail
    m = LAST_LINE.match(out[-1])
    assert m, tail
    n = {k: int(v) for k, v in m.groupdict().items() if k != "result"}
    assert m["result"] == "PASS" and proc.returncode == 0, tail
    assert n["jobs"] == 200
    assert n["done"] + n["failed"] == 200 and n["failed"] == n["expected"] and n["dead"] == 0
    assert n["files"] == n["done"] and n["extra_links"] == 0
    assert n["kills"] >= 2 and n["redis_restarts"] == 1
