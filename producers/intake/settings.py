"""The intake's settings, read once at start and passed down."""

from __future__ import annotations

from dataclasses import dataclass

from producers.config import ConfigError, SharedSettings, env_int

# The workers' default (workers/url_source.py): the intake reads the same variable itself.
DEFAULT_MAX_SOURCE_BYTES = 5 * 1024 * 1024 * 1024


@dataclass(frozen=True)
class IntakeSettings:
    shared: SharedSettings
    # AWORK_MAX_SOURCE_BYTES: the largest request body (or multipart file) accepted.
    max_body_bytes: int

    @classmethod
    def from_env(cls) -> IntakeSettings:
        shared = SharedSettings.from_env()
        cap = env_int("AWORK_MAX_SOURCE_BYTES", DEFAULT_MAX_SOURCE_BYTES)
        if cap <= 0:
            raise ConfigError(f"AWORK_MAX_SOURCE_BYTES: expected a positive number of bytes, got {cap}")
        return cls(shared=shared, max_body_bytes=cap)

