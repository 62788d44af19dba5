"""The intake's settings, read once at start and passed down."""

from __future__ import annotations

from dataclasses import dataclass

from producers.config import SharedSettings, max_source_bytes_from_env


@dataclass(frozen=True)
class IntakeSettings:
    shared: SharedSettings
    # AWORK_MAX_SOURCE_BYTES: the largest request body (or multipart file) accepted.
    max_body_bytes: int

    @classmethod
    def from_env(cls) -> IntakeSettings:
        return cls(shared=SharedSettings.from_env(), max_body_bytes=max_source_bytes_from_env())

