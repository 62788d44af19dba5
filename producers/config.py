"""Settings that producers and workers share, read from the environment (a `.env` file works too).

Secrets (API keys) are not read here: producers never need them. Workers read them in
`workers.settings`.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from producers.block_digests import DEFAULT_BLOCK_SIZE, DEFAULT_SINGLE_PUT_THRESHOLD
from producers.staging_mode import PRIVATE, StagingMode, StagingModeError

DEFAULT_API_URL = "https://api.awork.com/api/v1"
DEFAULT_WORKSPACE = "default"
# Written by `awork-uploads stack` so that other shells find the running stack's Redis.
STACK_ENV_FILE = Path("var/stack.env")


class ConfigError(ValueError):
    """A setting is missing or malformed. The message names the variable."""


def load_dotenv(path: Path = Path(".env")) -> None:
    """Set variables from a `.env` file without overriding the real environment."""
    for file in (path, STACK_ENV_FILE):
        if not file.is_file():
            continue
        for raw in file.read_text().splitlines():
            line = raw.strip()
            if not line or line.startswith("#") or "=" not in line:
                continue
            key, _, value = line.partition("=")
            key = key.strip().removeprefix("export ").strip()
            value = value.strip().strip("'\"")
            os.environ.setdefault(key, value)


def redact_url(url: str) -> str:
    """The URL minus its password, for messages and logs (each of a sentinel URL's `;` parts)."""
    if ";" in url:
        return ";".join(redact_url(part) for part in url.split(";"))
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    user = parts.username or ""
    netloc = f"{user}:***@{host}" if user else f":***@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def env_int(name: str, default: int) -> int:
    """A whole number from the environment; blank = default; anything else names the variable."""
    raw = os.environ.get(name, "").strip()
    try:
        return int(raw) if raw else default
    except ValueError:
        raise ConfigError(f"{name}: expected a whole number, got {raw!r}") from None


# AWORK_MAX_SOURCE_BYTES: the most a URL source may send (workers) and the largest request body
# the HTTP intake accepts; awork's own limits are lower still.
DEFAULT_MAX_SOURCE_BYTES = 5 * 1024 * 1024 * 1024


def max_source_bytes_from_env() -> int:
    """AWORK_MAX_SOURCE_BYTES, read the same way by workers and the intake."""
    cap = env_int("AWORK_MAX_SOURCE_BYTES", DEFAULT_MAX_SOURCE_BYTES)
    if cap <= 0:
        raise ConfigError(f"AWORK_MAX_SOURCE_BYTES: expected a positive number of bytes, got {cap}")
    return cap


def env_float(name: str, default: float) -> float:
    """A number (seconds, ratios) from the environment; blank = default."""
    raw = os.environ.get(name, "").strip()
    try:
        return float(raw) if raw else default
    except ValueError:
        raise ConfigError(f"{name}: expected a number, got {raw!r}") from None


def env_flag(name: str, default: bool = False) -> bool:
    """A switch from the environment: 1/true/yes/on or 0/false/no/off; blank = default."""
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}: expected 1 or 0 (true/false, yes/no, on/off), got {raw!r}")


@dataclass(frozen=True)
class SharedSettings:
    redis_url: str
    staging_dir: Path
    workspaces_file: Path | None
    # Finished job records expire after this many seconds (done, failed and dead alike).
    record_ttl_seconds: int
    # Hosts an http(s) source URL may name (host or host:port); empty = URL sources refused.
    source_url_hosts: tuple[str, ...]
    # The workers' block plan (AWORK_SINGLE_PUT_THRESHOLD, AWORK_BLOCK_SIZE): staging hashes
    # the blocks of larger files at this size, so the workers need not (producers.block_digests).
    single_put_threshold: int = DEFAULT_SINGLE_PUT_THRESHOLD
    block_size: int = DEFAULT_BLOCK_SIZE
    # Permissions of staged copies (AWORK_STAGING_MODE: private 0600/0700, group 0640/0770).
    staging_mode: StagingMode = PRIVATE
    # AWORK_SANDBOX_TEST_MODE=1: the API is the sandbox, so `via awork` takes loopback sources
    # (the sandbox fetches from loopback test servers only). Never on against awork.
    sandbox_test_mode: bool = False
    # Hosts a completion callback may be POSTed to (AWORK_CALLBACK_HOSTS, producers.callback_url).
    callback_hosts: tuple[str, ...] = ()

    @classmethod
    def from_env(cls) -> SharedSettings:
        load_dotenv()
        redis_url = os.environ.get("REDIS_URL", "").strip()
        if not redis_url:
            raise ConfigError(
                "REDIS_URL: not set (start `awork-uploads stack`, or point REDIS_URL at the fleet's Redis)"
            )
        from producers.redis_conn import check_redis_url  # it imports this module

        check_redis_url(redis_url)
        wf = os.environ.get("AWORK_WORKSPACES_FILE", "").strip()
        hosts = os.environ.get("AWORK_SOURCE_URL_HOSTS", "")
        return cls(
            redis_url=redis_url,
            staging_dir=Path(os.environ.get("STAGING_DIR", "var/staging")).resolve(),
            workspaces_file=Path(wf) if wf else None,
            record_ttl_seconds=env_int("AWORK_RECORD_TTL", 7 * 24 * 3600),
            source_url_hosts=tuple(h.strip().lower() for h in hosts.split(",") if h.strip()),
            single_put_threshold=env_int("AWORK_SINGLE_PUT_THRESHOLD", DEFAULT_SINGLE_PUT_THRESHOLD),
            block_size=env_int("AWORK_BLOCK_SIZE", DEFAULT_BLOCK_SIZE),
            staging_mode=_staging_mode(),
            sandbox_test_mode=os.environ.get("AWORK_SANDBOX_TEST_MODE", "").strip().lower()
            in ("1", "true", "yes", "on"),
            callback_hosts=_callback_hosts(),
        )


def _callback_hosts() -> tuple[str, ...]:
    from producers.callback_url import callback_hosts_from_env

    return callback_hosts_from_env()


def _staging_mode() -> StagingMode:
    try:
        return StagingMode.from_env()
    except StagingModeError as exc:
        raise ConfigError(str(exc)) from None


def read_workspaces_file(path: Path) -> dict[str, dict[str, object]]:
    """Parse AWORK_WORKSPACES_FILE (TOML, `[workspaces.NAME]` tables) into name -> table."""
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"AWORK_WORKSPACES_FILE: {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"AWORK_WORKSPACES_FILE: {path} is not valid TOML: {exc}") from None
    tables = data.get("workspaces")
    if not isinstance(tables, dict) or not tables:
        raise ConfigError(f"AWORK_WORKSPACES_FILE: {path} has no [workspaces.NAME] table")
    out: dict[str, dict[str, object]] = {}
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise ConfigError(f"AWORK_WORKSPACES_FILE: workspaces.{name} must be a table")
        out[name] = table
    return out
