"""Redis replies as text: a client made with decode_responses=False answers bytes, one made
with it answers str, and a Lua script's reply can be either; every reader wants str."""

from __future__ import annotations


def as_str(value: bytes | str) -> str:
    """`value` as text (UTF-8 when it is bytes)."""
    return value.decode() if isinstance(value, bytes) else value
