"""The short fault soak (ops/soak): 500 jobs through a fleet under faults, kills and a Redis restart.

It runs `python -m ops.soak --jobs 500` as its own process (its own redis-server, sandbox and
workers) and checks its verdict: the last line, and the exit status (0 only on PASS). About two
minutes on two cores. The long form (`--jobs 2000`) is run by hand; its figures are in
ops/soak/README.md.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ops.soak.run import LAST_LINE

pytestmark = pytest.mark.slow

@pytest.mark.timeout(540)
def test_short_soak_passes() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWORK_", "REDIS_URL", "STAGING_DIR"))}
    # Its data goes to a temp dir, removed on PASS and kept (the path is printed) on FAIL.
    argv = [sys.executable, "-m", "ops.soak", "--jobs", "500", "--seed", "20240", "--timeout", "420"]
    proc = subprocess.run(
        argv,
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=500,
    )
    out = proc.stdout.strip().splitlines()
    assert out, proc.stderr[-3000:]
    tail = "\n".join(out[-40:])
    m = LAST_LINE.match(out[-1])
    assert m, tail
    n = {k: int(v) for k, v in m.groupdict().items() if k != "result"}
    assert m["result"] == "PASS", tail
    assert proc.returncode == 0, tail
    assert n["jobs"] == 500
    assert n["done"] + n["failed"] == 500 and n["failed"] == n["expected"] and n["dead"] == 0
    assert n["files"] == n["done"] and n["extra_links"] == 0
    assert n["kills"] >= 3 and n["redis_restarts"] == 1
