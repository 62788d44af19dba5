"""What can change while the sandbox runs: faults, latency, URL lifetime, limits, switches.

One dataclass, set from the command line at start and patched by `POST /_sandbox/faults`.
A patch names only what it changes; anything it does not name stays as it was, and an
unknown key is an error (a typo must not silently leave a fault switched off).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from .ratelimit import Limits

MIB = 1024 * 1024
# "stall_after": the request takes effect, then the answer is held for `stall_after_s` and the
# connection dropped (a client's read timeout strikes after awork applied the request).
FAULT_KINDS: tuple[str, ...] = ("429", "503", "500", "drop", "drop_after", "500_after", "stall_after")
# Route names for faults; "*" applies to every route that does not name a kind itself.
FAULT_ROUTES: tuple[str, ...] = (
    "generate", "link", "image_link", "multipart", "list", "download", "blob", "versions", "byurl",
    "*",
)
PERMISSION_LETTERS = "racwdl"


@dataclass
class RouteFaults:
    """Per-route fault probabilities and, optionally, this route's own latency."""

    probabilities: dict[str, float] = field(default_factory=dict)
    latency_ms: float | None = None
    jitter_ms: float | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.probabilities)
        if self.latency_ms is not None:
            out["latency_ms"] = self.latency_ms
        if self.jitter_ms is not None:
            out["jitter_ms"] = self.jitter_ms
        return out


@dataclass
class Settings:
    seed: int = 0
    routes: dict[str, RouteFaults] = field(default_factory=dict)
    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    # What a round trip does to one TCP stream: with a latency in effect, a blob request's body
    # arrives at no more than window / latency (the window's worth of bytes per round trip).
    # 0: bodies are not paced, latency is only a wait before the answer.
    window_kib: float = 0.0
    upload_url_lifetime_s: float = 900.0
    duplicate_on_relink: bool = False
    rate_limits: Limits = field(default_factory=Limits)
    workspace_limits: dict[str, Limits] = field(default_factory=dict)
    # Kong sends Retry-After with its 429s, awork does not document it: off unless asked for.
    retry_after_header: bool = False
    upload_url_permissions: str = "cw"
    put_blob_max_bytes: int = 5000 * MIB
    put_block_max_bytes: int = 4000 * MIB
    multipart_max_bytes: int = 1_000_000_000
    # awork's documented cap for POST .../files/byurl (the bytes it fetches itself).
    byurl_max_bytes: int = 100_000_000
    stall_after_s: float = 30.0

    def to_json(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "routes": {name: rf.to_json() for name, rf in sorted(self.routes.items())},
            "latency_ms": self.latency_ms,
            "jitter_ms": self.jitter_ms,
            "window_kib": self.window_kib,
            "upload_url_lifetime_s": self.upload_url_lifetime_s,
            "duplicate_on_relink": self.duplicate_on_relink,
            "rate_limits": {
                "per_minute": self.rate_limits.per_minute,
                "per_second": self.rate_limits.per_second,
                "workspaces": {
                    ws: {"per_minute": lim.per_minute, "per_second": lim.per_second}
                    for ws, lim in sorted(self.workspace_limits.items())
                },
            },
            "retry_after_header": self.retry_after_header,
            "upload_url_permissions": self.upload_url_permissions,
            "put_blob_max_bytes": self.put_blob_max_bytes,
            "put_block_max_bytes": self.put_block_max_bytes,
            "multipart_max_bytes": self.multipart_max_bytes,
            "byurl_max_bytes": self.byurl_max_bytes,
            "stall_after_s": self.stall_after_s,
        }

    def patched(self, body: Any) -> Settings:
        """A copy with `body` (the admin API's JSON) applied; ValueError on anything wrong."""
        if not isinstance(body, dict):
            raise ValueError("expected a JSON object")
        new = copy.deepcopy(self)
        for key, value in body.items():
            if key == "seed":
                new.seed = _int(key, value, minimum=None)
            elif key == "routes":
                _patch_routes(new.routes, value)
            elif key in ("latency_ms", "jitter_ms", "window_kib", "stall_after_s"):
                setattr(new, key, _number(key, value))
            elif key == "upload_url_lifetime_s":
                new.upload_url_lifetime_s = _number(key, value)
            elif key in ("duplicate_on_relink", "retry_after_header"):
                if not isinstance(value, bool):
                    raise ValueError(f"{key}: expected true or false")
                setattr(new, key, value)
            elif key == "rate_limits":
                new.rate_limits, new.workspace_limits = _patch_limits(
                    new.rate_limits, new.workspace_limits, value
                )
            elif key == "upload_url_permissions":
                if (
                    not isinstance(value, str)
                    or not value
                    or any(c not in PERMISSION_LETTERS for c in value)
                ):
                    raise ValueError(f"{key}: letters from {PERMISSION_LETTERS!r}")
                new.upload_url_permissions = "".join(c for c in PERMISSION_LETTERS if c in value)
            elif key in (
                "put_blob_max_bytes", "put_block_max_bytes", "multipart_max_bytes", "byurl_max_bytes"
            ):
                setattr(new, key, _int(key, value, minimum=0))
            else:
                raise ValueError(f"unknown setting {key!r}")
        return new


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError(f"{key}: expected a number >= 0")
    return float(value)


def _int(key: str, value: Any, minimum: int | None = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key}: expected an integer")
    if minimum is not None and value < minimum:
        raise ValueError(f"{key}: expected an integer >= {minimum}")
    return value


def _patch_routes(routes: dict[str, RouteFaults], value: Any) -> None:
    if not isinstance(value, dict):
        raise ValueError("routes: expected an object of route name -> faults")
    for name, spec in value.items():
        if name not in FAULT_ROUTES:
            raise ValueError(f"routes: unknown route {name!r} (one of {', '.join(FAULT_ROUTES)})")
        if spec is None:
            routes.pop(name, None)
            continue
        if not isinstance(spec, dict):
            raise ValueError(f"routes.{name}: expected an object")
        rf = routes.setdefault(name, RouteFaults())
        for kind, p in spec.items():
            if kind in ("latency_ms", "jitter_ms"):
                setattr(rf, kind, None if p is None else _number(f"routes.{name}.{kind}", p))
                continue
            if kind not in FAULT_KINDS:
                raise ValueError(
                    f"routes.{name}: unknown fault {kind!r} (one of {', '.join(FAULT_KINDS)})"
                )
            if p is None:
                rf.probabilities.pop(kind, None)
                continue
            prob = _number(f"routes.{name}.{kind}", p)
            if prob > 1:
                raise ValueError(f"routes.{name}.{kind}: a probability is at most 1")
            rf.probabilities[kind] = prob
        if sum(rf.probabilities.values()) > 1 + 1e-9:
            raise ValueError(f"routes.{name}: the probabilities add up to more than 1")


def _limits(key: str, value: Any, base: Limits) -> Limits:
    if not isinstance(value, dict):
        raise ValueError(f"{key}: expected an object with per_minute and/or per_second")
    unknown = set(value) - {"per_minute", "per_second"}
    if unknown:
        raise ValueError(f"{key}: unknown keys {sorted(unknown)}")
    return Limits(
        per_minute=_int(f"{key}.per_minute", value.get("per_minute", base.per_minute)),
        per_second=_int(f"{key}.per_second", value.get("per_second", base.per_second)),
    )


def _patch_limits(
    default: Limits, workspaces: dict[str, Limits], value: Any
) -> tuple[Limits, dict[str, Limits]]:
    if not isinstance(value, dict):
        raise ValueError("rate_limits: expected an object")
    value = dict(value)
    ws_patch = value.pop("workspaces", None)
    new_default = _limits("rate_limits", value, default) if value else default
    new_ws = dict(workspaces)
    if ws_patch is not None:
        if not isinstance(ws_patch, dict):
            raise ValueError("rate_limits.workspaces: expected an object")
        for ws, lim in ws_patch.items():
            if lim is None:
                new_ws.pop(ws, None)
            else:
                new_ws[ws] = _limits(
                    f"rate_limits.workspaces.{ws}", lim, new_ws.get(ws, new_default)
                )
    return new_default, new_ws
