"""API tokens of client applications (the HTTP intake): data in Redis, only their hashes.

A token is `awu_<id>_<secret>`. Redis keeps, per id, a hash: its name, the workspaces it may
enqueue into, its request rate (per second), the SHA-256 of the secret, and the token's callback
signing secret as ciphertext under AWORK_SECRETS_KEY (sealed by `awork-uploads api-tokens
create`, which runs where that key is, like `connections add`; only the workers, which hold the
key anyway, open it to sign callbacks). The intake needs no key: it checks a token by its hash
and never sees a callback secret. Revoking deletes the hash: the next request with it is 401.

`authenticate` checks the secret and counts the request against the token's rate in one Lua
call (one round trip per request); a wrong secret is not counted, so guessing at someone's
token id cannot use up their rate.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from producers.contract import SpecError
from producers.keys import API_TOKENS_KEY, api_rate_key, api_token_key
from producers.redis_text import as_str

PREFIX = "awu_"
_TOKEN = re.compile(r"awu_([0-9a-f]{16})_([A-Za-z0-9_-]{43})")
DEFAULT_RATE_PER_SECOND = 50
CALLBACK_SECRET_FIELD = "callback_secret"

_AUTH = """
local h = redis.call("HMGET", KEYS[1], "hash", "name", "workspaces", "rate")
if not h[1] or h[1] ~= ARGV[1] then
  return {0}
end
local n = redis.call("INCR", KEYS[2])
if n == 1 then
  redis.call("EXPIRE", KEYS[2], 2)
end
return {1, n, h[2], h[3], h[4]}
"""


@dataclass(frozen=True)
class TokenInfo:
    id: str
    name: str
    workspaces: tuple[str, ...]
    rate: int
    created_at: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "workspaces": list(self.workspaces),
            "rate": self.rate,
            "created_at": self.created_at,
        }


@dataclass(frozen=True)
class Authenticated:
    token: TokenInfo
    over_rate: bool
    retry_after: int  # seconds, when over_rate


@dataclass(frozen=True)
class NewToken:
    token: str  # shown once
    callback_secret: str  # shown once
    info: TokenInfo


AUTH_SCRIPT = _AUTH


def auth_call(presented: str, now: float | None = None) -> tuple[list[str], list[str]] | None:
    """KEYS and ARGV of the auth script for a presented token (None: not a token at all), so
    that a caller can pipeline it with its own read (the intake's GET)."""
    m = _TOKEN.fullmatch(presented or "")
    if not m:
        return None
    token_id, secret = m.group(1), m.group(2)
    second = int(time.time() if now is None else now)
    return [api_token_key(token_id), api_rate_key(token_id, second)], [_hash(secret)]


def auth_answer(keys: list[str], got: Any) -> Authenticated | None:
    if not got or int(got[0]) != 1:
        return None
    token_id = keys[0].rsplit(":", 1)[1]
    count, name, workspaces, rate = int(got[1]), as_str(got[2]), as_str(got[3]), int(as_str(got[4]) or 1)
    info = TokenInfo(token_id, name, tuple(w for w in workspaces.split(",") if w), rate)
    return Authenticated(info, count > rate, 1)


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_callback_secret() -> str:
    """A Standard Webhooks style secret: `whsec_` + base64 of 32 random bytes."""
    import base64

    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


class ApiTokens:
    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._auth = client.register_script(_AUTH)

    def create(
        self,
        name: str,
        workspaces: Sequence[str],
        seal: Callable[[str], str],
        rate: int = DEFAULT_RATE_PER_SECOND,
    ) -> NewToken:
        """A new token; `seal` encrypts its callback secret (the caller holds the key)."""
        from producers.connections import check_name

        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_. -]{0,63}", name):
            raise SpecError("name", f"{name!r}: letters, digits, space, _ . - (at most 64)")
        if not workspaces:
            raise SpecError("workspace", "name at least one workspace the token may enqueue into")
        for w in workspaces:
            check_name(w)
        if not isinstance(rate, int) or rate < 1:
            raise SpecError("rate", f"expected a positive number of requests per second, got {rate!r}")
        token_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        callback_secret = new_callback_secret()
        info = TokenInfo(token_id, name, tuple(dict.fromkeys(workspaces)), rate, time.time())
        pipe = self.redis.pipeline()
        pipe.hset(
            api_token_key(token_id),
            mapping={
                "id": token_id,
                "name": name,
                "workspaces": ",".join(info.workspaces),
                "rate": str(rate),
                "hash": _hash(secret),
                CALLBACK_SECRET_FIELD: seal(callback_secret),
                "created_at": repr(info.created_at),
            },
        )
        pipe.sadd(API_TOKENS_KEY, token_id)
        pipe.execute()
        return NewToken(f"{PREFIX}{token_id}_{secret}", callback_secret, info)

    def authenticate(self, presented: str, now: float | None = None) -> Authenticated | None:
        """The token's info and whether this request is over its rate; None when unknown."""
        call = auth_call(presented, now)
        if call is None:
            return None
        keys, args = call
        return auth_answer(keys, self._auth(keys=keys, args=args))

    def listed(self) -> list[TokenInfo]:
        ids = sorted(as_str(i) for i in self.redis.smembers(API_TOKENS_KEY))
        pipe = self.redis.pipeline(transaction=False)
        for i in ids:
            pipe.hmget(api_token_key(i), "name", "workspaces", "rate", "created_at")
        out = []
        for i, (name, ws, rate, created) in zip(ids, pipe.execute(), strict=True):
            if name is None:
                continue
            workspaces = tuple(w for w in as_str(ws or b"").split(",") if w)
            rate_n, created_at = int(as_str(rate or b"1")), float(as_str(created or b"0"))
            out.append(TokenInfo(i, as_str(name), workspaces, rate_n, created_at))
        return out

    def revoke(self, id_or_name: str) -> list[str]:
        """Delete tokens by id or name; returns the ids revoked."""
        ids = [t.id for t in self.listed() if id_or_name in (t.id, t.name)]
        if ids:
            pipe = self.redis.pipeline()
            for i in ids:
                pipe.delete(api_token_key(i))
                pipe.srem(API_TOKENS_KEY, i)
            pipe.execute()
        return ids

    def sealed_callback_secret(self, token_id: str) -> str | None:
        """The ciphertext of a token's callback secret (the workers open it), None if revoked."""
        raw = self.redis.hget(api_token_key(token_id), CALLBACK_SECRET_FIELD)
        return None if raw is None else as_str(raw)
