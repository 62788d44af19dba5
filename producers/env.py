"""Reading one environment variable: a malformed value raises ConfigError naming the variable.

Its own module so that the Redis client factory (producers.redis_conn) and the settings
(producers.config, which checks REDIS_URL with that factory) both use it without importing each other.
"""

from __future__ import annotations

import os


class ConfigError(ValueError):
    """A setting is missing or malformed. The message names the variable."""


def env_int(name: str, default: int) -> int:
    """A whole number from the environment; blank = default; anything else names the variable."""
    raw = os.environ.get(name, "").strip()
    try:
        return int(raw) if raw else default
    except ValueError:
        raise ConfigError(f"{name}: expected a whole number, got {raw!r}") from None


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
