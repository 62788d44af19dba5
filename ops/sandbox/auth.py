"""The sandbox's secret checks, in constant time (hmac.compare_digest, never == or a dict lookup):
how long a refusal takes must not tell a caller how much of a token was right."""

from __future__ import annotations

import hmac
from collections.abc import Mapping


def _raw(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def same_secret(given: str, expected: str) -> bool:
    return hmac.compare_digest(_raw(given), _raw(expected))


def workspace_for_key(keys: Mapping[str, str], token: str) -> str | None:
    """The workspace of the API key `token`, comparing it with every key (no early exit)."""
    found: str | None = None
    for key, workspace in keys.items():
        if same_secret(token, key) and found is None:
            found = workspace
    return found
