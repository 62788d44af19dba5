"""Every key and value of a Redis database as text, for the leak scans (no secret may be there)."""

from __future__ import annotations

from collections.abc import Mapping

import redis


def redis_contents(
    client: redis.Redis, skip_fields: Mapping[bytes, set[bytes]] | None = None
) -> list[tuple[str, str]]:
    """(key, its key and value as text) for every key; `skip_fields` names hash fields
    (key -> fields) left out of the scan."""
    skip = skip_fields or {}
    out = []
    for key in client.scan_iter(count=1000):
        kind = client.type(key)
        kind = kind.decode() if isinstance(kind, bytes) else kind
        value: object
        if kind == "string":
            value = client.get(key)
        elif kind == "hash":
            value = {f: v for f, v in client.hgetall(key).items() if f not in skip.get(key, set())}
        elif kind == "list":
            value = client.lrange(key, 0, -1)
        elif kind == "set":
            value = client.smembers(key)
        elif kind == "zset":
            value = client.zrange(key, 0, -1)
        else:
            value = b""
        name = key.decode(errors="replace") if isinstance(key, bytes) else str(key)
        out.append((name, f"{key!r} {value!r}"))
    return out
