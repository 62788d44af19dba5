"""The worker reads its settings once, at start: a bad value stops it there, naming the variable,
instead of failing the first step that needs it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import workers.runtime
from producers.config import ConfigError
from workers.runtime import runtime
from workers.settings import WorkerSettings
from workers.signals import refuse_bad_settings


@pytest.fixture
def worker_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    for key in list(os.environ):
        if key.startswith("AWORK_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")  # never contacted
    monkeypatch.setenv("STAGING_DIR", str(tmp_path / "staging"))
    monkeypatch.setenv("AWORK_API_KEY", "k")
    monkeypatch.setattr(workers.runtime, "_runtime", None)  # this process's runtime, built afresh
    return monkeypatch


@pytest.mark.parametrize(
    ("name", "value"),
    [("AWORK_BLOCK_SIZE", "0"), ("AWORK_PARALLEL_BLOCKS", "0"), ("AWORK_SINGLE_PUT_THRESHOLD", "-1")],
)
def test_a_bad_block_plan_is_a_configuration_error_naming_its_variable(
    worker_env: pytest.MonkeyPatch, name: str, value: str
) -> None:
    worker_env.setenv(name, value)
    with pytest.raises(ConfigError, match=rf"^{name}: "):
        WorkerSettings.from_env()


def test_the_block_plan_is_read_with_the_other_settings(worker_env: pytest.MonkeyPatch) -> None:
    worker_env.setenv("AWORK_BLOCK_SIZE", str(256 * 1024))
    worker_env.setenv("AWORK_PARALLEL_BLOCKS", "3")
    settings = WorkerSettings.from_env()
    assert (settings.transfer.block_size, settings.transfer.parallel_blocks) == (256 * 1024, 3)


def test_the_worker_stops_at_start_on_a_bad_block_size(worker_env: pytest.MonkeyPatch) -> None:
    worker_env.setenv("AWORK_BLOCK_SIZE", "0")
    with pytest.raises(SystemExit) as stopped:
        refuse_bad_settings()
    assert stopped.value.code == 2


def test_the_settings_read_at_start_are_the_ones_the_steps_use(worker_env: pytest.MonkeyPatch) -> None:
    worker_env.setenv("AWORK_PARALLEL_BLOCKS", "2")
    refuse_bad_settings()
    worker_env.setenv("AWORK_PARALLEL_BLOCKS", "5")  # read once: a later change is not seen
    assert runtime().settings.transfer.parallel_blocks == 2
    assert runtime().uploader.policy.parallel_blocks == 2
