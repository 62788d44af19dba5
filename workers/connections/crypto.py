"""Secrets at rest: Fernet ciphertext under AWORK_SECRETS_KEY / AWORK_SECRETS_KEY_FILE.

Several keys may be given, comma-separated: the first encrypts, all decrypt (MultiFernet), so a
new key can be rolled out first and `awork-uploads connections rekey` re-encrypts afterwards.
A key is 32 random bytes, urlsafe base64 (Fernet's format):
`python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())'`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from producers.config import ConfigError
from workers.secret_files import secret_from_env

ENV_KEY = "AWORK_SECRETS_KEY"
ENV_KEY_FILE = "AWORK_SECRETS_KEY_FILE"


class SecretBox:
    """Encrypts and decrypts small JSON objects; never shows its keys."""

    def __init__(self, keys: list[str]) -> None:
        if not keys:
            raise ConfigError(f"{ENV_KEY}: no key given")
        fernets = []
        for i, k in enumerate(keys):
            try:
                fernets.append(Fernet(k.encode()))
            except (ValueError, TypeError):
                raise ConfigError(
                    f"{ENV_KEY}: key #{i + 1} is not a Fernet key (32 bytes, urlsafe base64)"
                ) from None
        self._multi = MultiFernet(fernets)
        self.key_count = len(fernets)

    def __repr__(self) -> str:
        return f"SecretBox(keys={self.key_count})"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> SecretBox:
        env = os.environ if environ is None else environ
        raw = secret_from_env(env, ENV_KEY)
        if not raw:
            raise ConfigError(
                f"{ENV_KEY}: not set (connections keep their secrets encrypted under it; "
                f"set {ENV_KEY} or {ENV_KEY_FILE})"
            )
        return cls([k.strip() for k in raw.split(",") if k.strip()])

    def seal(self, data: Mapping[str, Any]) -> str:
        return self._multi.encrypt(json.dumps(dict(data), separators=(",", ":")).encode()).decode()

    def open(self, token: str | bytes) -> dict[str, Any]:
        raw = token.encode() if isinstance(token, str) else token
        try:
            value = json.loads(self._multi.decrypt(raw))
        except InvalidToken:
            raise ConfigError(
                f"{ENV_KEY}: a stored secret does not decrypt with any configured key "
                "(was a key removed before `connections rekey`?)"
            ) from None
        if not isinstance(value, dict):
            raise ConfigError("a stored secret is not an object")
        return value

    def rotate(self, token: str | bytes) -> str:
        """The same plaintext under the first key."""
        raw = token.encode() if isinstance(token, str) else token
        try:
            return self._multi.rotate(raw).decode()
        except InvalidToken:
            raise ConfigError(
                f"{ENV_KEY}: a stored secret does not decrypt with any configured key"
            ) from None
