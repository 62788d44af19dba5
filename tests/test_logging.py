"""Worker logs: the JSON format, the step-outcome line, redaction of credentials, the Celery hooks."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ops.processes import Child
from workers.logging_setup import (
    STEP_FIELDS,
    JsonFormatter,
    RedactingFilter,
    install,
    log_format,
    redact,
    step_outcome,
)

REPO = Path(__file__).resolve().parent.parent

TOKEN = "eyJhbGciOiJIUzI1NiJ9.c2VjcmV0LWFwaS1rZXk.s1gnatur3"
SAS_SIG = "Xk2%2FsEcReTsIgNaTuRe%3D"
SAS_URL = f"https://blob.example.net/c/f?sv=2023-11-03&se=2030-01-01T00%3A00%3A00Z&sp=cw&sig={SAS_SIG}"
REDIS_PASSWORD = "r3dis-pa55word"
SECRETS = (TOKEN, SAS_SIG, REDIS_PASSWORD)


@pytest.fixture
def capture() -> Iterator[tuple[logging.Logger, io.StringIO, logging.Handler]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
    logger = logging.getLogger(f"test.logging.{time.monotonic_ns()}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    yield logger, stream, handler
    logger.removeHandler(handler)


def lines(stream: io.StringIO) -> list[str]:
    return [line for line in stream.getvalue().splitlines() if line]


def test_json_format_is_one_object_per_line_with_the_structured_fields(capture) -> None:  # type: ignore[no-untyped-def]
    logger, stream, handler = capture
    install([handler], "json")
    logger.info("plain message")
    logger.warning(
        "step %s outcome %s", "put", "retry",
        extra={"job": "j1", "workspace": "acme", "step": "put", "attempt": 2, "outcome": "retry",
               "status": 503, "code": "ServiceUnavailable", "trace_id": "t-123", "wait": 1.5},
    )  # fmt: skip
    try:
        raise ValueError("first line\nsecond line")
    except ValueError:
        logger.exception("it broke")
    out = lines(stream)
    assert len(out) == 3, out
    records = [json.loads(line) for line in out]
    first, second, third = records
    assert set(first) == {"ts", "level", "logger", "message"}
    assert first["ts"].endswith("Z") and first["level"] == "INFO" and first["logger"] == logger.name
    assert second["message"] == "step put outcome retry"
    assert second["level"] == "WARNING"
    expected = ["j1", "acme", "put", 2, "retry", 503, "ServiceUnavailable", "t-123"]
    assert [second[field] for field in STEP_FIELDS] == expected
    assert second["wait"] == 1.5
    # step fields come right after the four fixed keys, in their documented order
    assert list(second)[4 : 4 + len(STEP_FIELDS)] == list(STEP_FIELDS)
    assert "ValueError: first line" in third["exc"] and "Traceback" in third["exc"]


def test_step_outcome_is_one_line_in_text_and_in_json(capture) -> None:  # type: ignore[no-untyped-def]
    logger, stream, handler = capture
    install([handler], "text")
    step_outcome(logger, job="j9", workspace="default", step="link", attempt=1, outcome="failed",
                 status=404, code="NotFound", trace_id="abc-1")  # fmt: skip
    (text,) = lines(stream)
    for part in ("job=j9", "workspace=default", "step=link", "attempt=1", "outcome=failed", "status=404",
                 "code=NotFound", "trace_id=abc-1"):  # fmt: skip
        assert part in text

    stream.truncate(0)
    stream.seek(0)
    handler.setFormatter(JsonFormatter())
    step_outcome(logger, job="j9", workspace="default", step="put", attempt=3, outcome="ok", wait=0.5)
    (line,) = lines(stream)
    record = json.loads(line)
    assert record["job"] == "j9" and record["step"] == "put" and record["attempt"] == 3
    assert record["outcome"] == "ok" and record["wait"] == 0.5
    assert "status" not in record  # None fields are left out of JSON
    assert "status=-" in record["message"]


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_credentials_are_masked_in_every_part_of_a_record(capture, fmt: str) -> None:  # type: ignore[no-untyped-def]
    logger, stream, handler = capture
    install([handler], fmt)
    logger.info("request headers %s", {"Authorization": f"Bearer {TOKEN}"})
    logger.info("PUT %s failed", SAS_URL)
    logger.info("connecting to redis://:%s@redis.internal:6379/0", REDIS_PASSWORD)
    logger.info("config", extra={"url": SAS_URL, "job": "j1"})
    logger.info("basic auth FLOWER_BASIC_AUTH=admin:%s", REDIS_PASSWORD)
    try:
        raise RuntimeError(f"upload to {SAS_URL} with Authorization: Bearer {TOKEN}")
    except RuntimeError:
        logger.exception("step failed")
    text = stream.getvalue()
    for secret in SECRETS:
        assert secret not in text, f"{secret!r} leaked in {fmt}:\n{text}"
    assert text.count("***") >= 6
    # what is not secret stays readable
    assert "blob.example.net" in text and "se=2030-01-01" in text and "redis.internal" in text


def test_redact_leaves_ordinary_lines_alone() -> None:
    for line in (
        "step=put job=1 workspace=default attempt=2 outcome=retry status=503 code=- trace_id=abc",
        "AWORK_API_KEY: not set (the default workspace has no key)",
        "waiting 2.0s for a rate token",
        "https://api.awork.com/api/v1/files/generateuploadurl",
    ):
        assert redact(line) == line


def test_the_filter_is_installed_once_and_keeps_broken_records_alive(capture) -> None:  # type: ignore[no-untyped-def]
    logger, _stream, handler = capture
    install([handler], "text")
    install([handler], "text")
    assert sum(isinstance(f, RedactingFilter) for f in handler.filters) == 1
    logging.raiseExceptions = False
    try:
        logger.info("two args %s %s", "one")  # a broken call must not raise from the filter
    finally:
        logging.raiseExceptions = True


def test_log_format_comes_from_the_environment() -> None:
    assert log_format({}) == "text"
    assert log_format({"AWORK_LOG_FORMAT": "JSON"}) == "json"
    assert log_format({"AWORK_LOG_FORMAT": "text"}) == "text"
    assert log_format({"AWORK_LOG_FORMAT": "yaml"}) == "text"


SCRIPT = """
import logging
import workers.logging_setup  # connects the hooks
from celery import Celery

app = Celery("t", set_as_current=False)
app.conf.worker_hijack_root_logger = False
app.log.setup(loglevel="INFO")
steps = logging.getLogger("awork.steps")
steps.info("PUT https://h/b?sig=%s", "SECRETSIG", extra={"job": "j1", "step": "put"})
logging.getLogger("celery.task").info("task line Bearer SECRETTOKEN")
"""


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_celery_logging_signals_install_the_format_and_the_filter(fmt: str) -> None:
    env = {**os.environ, "AWORK_LOG_FORMAT": fmt}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert "SECRETSIG" not in output and "SECRETTOKEN" not in output, output
    ours = [line for line in output.splitlines() if "sig=***" in line or "Bearer ***" in line]
    assert len(ours) == 2, output
    if fmt == "json":
        records = [json.loads(line) for line in ours]
        assert records[0]["logger"] == "awork.steps" and records[0]["job"] == "j1"
        assert records[1]["logger"] == "celery.task"
    else:
        assert all(not line.startswith("{") for line in ours)


@pytest.mark.slow
def test_a_real_worker_logs_json(redis_url: str, staging_dir: Path, tmp_path: Path) -> None:
    log = tmp_path / "worker.log"
    env = {
        "PATH": "/usr/bin:/bin",
        "REDIS_URL": redis_url,
        "STAGING_DIR": str(staging_dir),
        "AWORK_LOG_FORMAT": "json",
    }
    argv = [
        sys.executable, "-m", "celery", "-A", "workers", "worker", "--pool=threads", "--concurrency=1",
        "--hostname=logjson@%h", "--loglevel=INFO", "--without-mingle", "--without-gossip",
        "--include=workers.logging_setup",
    ]  # fmt: skip
    child = Child("worker", argv, env, log).start()
    try:
        deadline = time.monotonic() + 45
        ready = None
        while time.monotonic() < deadline and ready is None:
            for line in log.read_text(errors="replace").splitlines() if log.exists() else []:
                if line.startswith("{") and "ready." in line:
                    ready = json.loads(line)
            if not child.alive():
                break
            time.sleep(0.2)
        assert ready is not None, log.read_text(errors="replace")[-3000:]
        assert ready["level"] == "INFO" and ready["logger"].startswith("celery")
    finally:
        child.stop(15)
