"""Worker-side configuration: where awork is, the workspaces' keys and limits, where PUTs may go.

API keys are read here and only here. `Secret` keeps them out of reprs, logs and tracebacks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from producers.config import (
    DEFAULT_MAX_SOURCE_BYTES,
    DEFAULT_WORKSPACE,
    ConfigError,
    SharedSettings,
    env_float,
    env_int,
    max_source_bytes_from_env,
    read_workspaces_file,
)
from workers.api_url import api_url_from_env, check_api_url, insecure_api_allowed
from workers.blob import TransferPolicy
from workers.limits_config import WorkspaceLimits
from workers.secret_files import read_secret_file


class Secret:
    """A string that never shows itself: repr and str print a placeholder."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self._value)


@dataclass(frozen=True)
class Workspace:
    name: str
    api_key: Secret = field(repr=False)
    limits: WorkspaceLimits
    api_url: str
    share: float = 1.0  # its weight in the fleet's transfer slots (workers/fair_share.py)


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff with full jitter for transient errors; waits for rate tokens do not count."""

    max_attempts: int = 8
    base_seconds: float = 2.0
    max_seconds: float = 300.0
    # A step whose worker died more than this many times (a poison message) sends the job to
    # `dead`: AWORK_MAX_CRASHES.
    max_crashes: int = 5


@dataclass(frozen=True)
class WorkerSettings:
    shared: SharedSettings
    api_url: str
    workspaces: dict[str, Workspace]
    upload_hosts: tuple[str, ...]
    retry: RetryPolicy
    connect_timeout: float
    read_timeout: float
    # AWORK_MAX_SOURCE_BYTES: a URL source that announces or sends more fails `source-too-large`.
    max_source_bytes: int = DEFAULT_MAX_SOURCE_BYTES
    # How a transfer is cut into blocks (AWORK_SINGLE_PUT_THRESHOLD, AWORK_BLOCK_SIZE,
    # AWORK_PARALLEL_BLOCKS): read with the rest, so a bad value stops the worker at start.
    transfer: TransferPolicy = field(default_factory=TransferPolicy)
    # Completion callbacks (workers/callbacks.py): AWORK_CALLBACK_MAX_AGE, AWORK_CALLBACK_RETRY_BASE.
    callback_max_age: float = 24 * 3600.0
    callback_retry_base: float = 5.0

    @classmethod
    def from_env(cls) -> WorkerSettings:
        from workers.fair_share import check_share
        from workers.limits_config import limits_for_workspace

        shared = SharedSettings.from_env()
        allow_insecure = insecure_api_allowed()
        api_url = api_url_from_env(allow_insecure)
        workspaces: dict[str, Workspace] = {}
        if shared.workspaces_file is not None:
            for name, table in read_workspaces_file(shared.workspaces_file).items():
                key = _key_from_table(name, table)
                limits = limits_for_workspace(name, table)
                ws_url = str(table.get("api_url") or api_url)
                check_api_url(f"AWORK_WORKSPACES_FILE: workspaces.{name}.api_url", ws_url, allow_insecure)
                share = check_share(table.get("share"), f"AWORK_WORKSPACES_FILE: workspaces.{name}.share")
                workspaces[name] = Workspace(name, key, limits, ws_url.rstrip("/"), share)
        env_key = os.environ.get("AWORK_API_KEY", "").strip()
        if env_key and DEFAULT_WORKSPACE not in workspaces:
            workspaces[DEFAULT_WORKSPACE] = Workspace(
                DEFAULT_WORKSPACE,
                Secret(env_key),
                limits_for_workspace(DEFAULT_WORKSPACE),
                api_url,
            )
        hosts = tuple(
            h.strip().lower() for h in os.environ.get("AWORK_UPLOAD_HOSTS", "").split(",") if h.strip()
        )
        return cls(
            shared=shared,
            api_url=api_url,
            workspaces=workspaces,
            upload_hosts=hosts,
            retry=RetryPolicy(
                max_attempts=env_int("AWORK_MAX_ATTEMPTS", 8),
                base_seconds=env_float("AWORK_RETRY_BASE_SECONDS", 2.0),
                max_seconds=env_float("AWORK_RETRY_MAX_SECONDS", 300.0),
                max_crashes=env_int("AWORK_MAX_CRASHES", 5),
            ),
            connect_timeout=env_float("AWORK_CONNECT_TIMEOUT", 10.0),
            read_timeout=env_float("AWORK_READ_TIMEOUT", 60.0),
            max_source_bytes=max_source_bytes_from_env(),
            transfer=transfer_policy_from_env(),
            callback_max_age=env_float("AWORK_CALLBACK_MAX_AGE", 24 * 3600.0),
            callback_retry_base=env_float("AWORK_CALLBACK_RETRY_BASE", 5.0),
        )

    def workspace(self, name: str) -> Workspace:
        try:
            return self.workspaces[name]
        except KeyError:
            raise ConfigError(
                f"workspace {name!r}: no API key configured on this worker "
                "(AWORK_API_KEY for `default`, or AWORK_WORKSPACES_FILE)"
            ) from None


def transfer_policy_from_env() -> TransferPolicy:
    """Block upload settings: AWORK_SINGLE_PUT_THRESHOLD, AWORK_BLOCK_SIZE (bytes),
    AWORK_PARALLEL_BLOCKS."""
    base = TransferPolicy()
    single = env_int("AWORK_SINGLE_PUT_THRESHOLD", base.single_put_threshold)
    block = env_int("AWORK_BLOCK_SIZE", base.block_size)
    parallel = env_int("AWORK_PARALLEL_BLOCKS", base.parallel_blocks)
    try:
        return TransferPolicy(single_put_threshold=single, block_size=block, parallel_blocks=parallel)
    except ValueError as exc:  # "block_size must be in ...": name the variable instead
        name = TRANSFER_ENV.get(str(exc).split()[0], ", ".join(TRANSFER_ENV.values()))
        raise ConfigError(f"{name}: {exc}") from None


# The variables of the block plan, by TransferPolicy field.
TRANSFER_ENV = {
    "single_put_threshold": "AWORK_SINGLE_PUT_THRESHOLD",
    "block_size": "AWORK_BLOCK_SIZE",
    "parallel_blocks": "AWORK_PARALLEL_BLOCKS",
}


def _key_from_table(name: str, table: dict[str, object]) -> Secret:
    where = f"AWORK_WORKSPACES_FILE: workspaces.{name}"
    if "api_key" in table:
        raise ConfigError(f"{where}.api_key: keys do not belong in the file; use api_key_env or api_key_file")
    env = table.get("api_key_env")
    if env:
        value = os.environ.get(str(env), "").strip()
        if not value:
            raise ConfigError(f"{where}.api_key_env: environment variable {env} is not set")
        return Secret(value)
    file = table.get("api_key_file")
    if file:
        return Secret(read_secret_file(f"{where}.api_key_file", Path(str(file))))
    raise ConfigError(f"{where}: set api_key_env or api_key_file")
