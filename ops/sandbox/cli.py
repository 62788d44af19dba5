"""`awork-uploads sandbox ...` / `python -m ops.sandbox ...`: flags -> SandboxConfig + Settings.

Every run-time setting of the admin API (POST /_sandbox/faults) has a flag, so a failing
run can be started again exactly as it was (same --seed, same faults).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import shutil
import sys
import tempfile
import uuid
from collections.abc import Coroutine, Mapping
from pathlib import Path
from typing import Any

from .core import Sandbox, SandboxConfig
from .ratelimit import Limits
from .server import print_ready, serve
from .settings import FAULT_KINDS, FAULT_ROUTES, MIB, Settings

DEMO_PER_TYPE = 3
# The sandbox's own variables, never AWORK_API_KEY: a real awork key must not reach the sandbox.
# Keys and the admin token come from here rather than the command line, so `ps` does not show them.
KEYS_ENV = "AWORK_SANDBOX_API_KEY"  # KEY[=WORKSPACE][,KEY[=WORKSPACE]...]
ADMIN_TOKEN_ENV = "AWORK_SANDBOX_ADMIN_TOKEN"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="awork-uploads sandbox",
        description="A strict stand-in for awork's file API and its Azure Blob upload URLs.",
    )
    _add_server_args(p)
    _add_limit_args(p)
    _add_fault_args(p)
    _add_behaviour_args(p)
    return p


def _add_server_args(p: argparse.ArgumentParser) -> None:
    """Where it listens, who may call it, and where its data lives."""
    a = p.add_argument
    a("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    a("--port", type=int, default=8765, help="API + admin port; 0 picks a free one (default 8765)")
    a("--blob-port", type=int, default=None,
      help="blob host port (default: --port + 1, or a free one when --port is 0)")
    a("--public-host", default=None,
      help="host name written into URLs (default: --host; 127.0.0.1 for 0.0.0.0)")
    a("--api-key", action="append", default=[], metavar="KEY[=WORKSPACE]",
      help=f"an accepted bearer token and its workspace (default workspace: default); "
      f"repeatable, added to those in {KEYS_ENV} (preferred: it stays out of `ps`). "
      f"Without any, one key is generated and printed as {KEYS_ENV}=")
    a("--oauth-client", action="append", default=[], metavar="ID:SECRET",
      help="an OAuth client the token endpoint accepts (HTTP Basic); repeatable")
    a("--oauth-access-lifetime", type=float, default=86400.0, metavar="SECONDS",
      help="expires_in of issued access tokens (default 86400, as awork's examples)")
    a("--admin-token", default=None,
      help=f"bearer token of the admin API (default: {ADMIN_TOKEN_ENV}, else generated and "
      "printed as SANDBOX_ADMIN_TOKEN=)")
    a("--data-dir", type=Path, default=None,
      help="where bytes are stored (default: a temporary directory removed on exit)")
    a("--seed-demo", action="store_true",
      help=f"create {DEMO_PER_TYPE} entities of each type and print them as SANDBOX_ENTITIES=")
    a("--seed", type=int, default=None,
      help="seed of the fault streams (and demo ids); default random, printed as SANDBOX_SEED=")


def _add_limit_args(p: argparse.ArgumentParser) -> None:
    """Kong's rate limits and the upload URLs' lifetime and permissions."""
    a = p.add_argument
    a("--rate-limit-per-minute", type=int, default=1000, metavar="N",
      help="requests per workspace per wall-clock minute (default 1000)")
    a("--rate-limit-per-second", type=int, default=50, metavar="N",
      help="requests per workspace per wall-clock second (default 50)")
    a("--workspace-rate-limit", action="append", default=[], metavar="WS=PER_MIN[/PER_SEC]",
      help="a workspace's own limits, e.g. enterprise=3000/50; repeatable")
    a("--retry-after", action="store_true",
      help="send Retry-After with 429s, as Kong does (awork does not document it; default off)")
    a("--upload-url-lifetime", type=float, default=900.0, metavar="SECONDS",
      help="validity of generated upload URLs (se=), default 900")
    a("--upload-url-permissions", default="cw", metavar="LETTERS",
      help="sp= of generated upload URLs (default cw; add r to allow Get Block List / Get Blob)")


def _add_fault_args(p: argparse.ArgumentParser) -> None:
    """Latency, a paced network and injected faults."""
    a = p.add_argument
    a("--latency-ms", type=float, default=0.0, help="added to every API and blob request")
    a("--jitter-ms", type=float, default=0.0, help="plus a uniform random 0..J ms")
    a("--window-kib", type=float, default=0.0, metavar="KIB",
      help="with a latency, pace each blob request body at KIB per round trip, as one TCP "
      "stream with that receive window would go (default 0: not paced)")
    a("--fault", action="append", default=[], metavar="ROUTE:KIND=P",
      help=f"inject a fault with probability P; ROUTE one of {', '.join(FAULT_ROUTES)}; "
      f"KIND one of {', '.join(FAULT_KINDS)}; repeatable, e.g. --fault 'link:500=0.1'")
    a("--faults-json", default=None, metavar="JSON|@FILE",
      help="a POST /_sandbox/faults body applied at start (after the other flags)")


def _add_behaviour_args(p: argparse.ArgumentParser) -> None:
    """awork's and Azure's caps and relink rule, and how the process runs."""
    a = p.add_argument
    a("--duplicate-on-relink", action="store_true",
      help="a second byuploadid link of one uploadId creates a second file (default: 400)")
    a("--put-blob-max-mib", type=int, default=5000,
      help="single Put Blob size cap in MiB (default 5000, as Azure)")
    a("--put-block-max-mib", type=int, default=4000,
      help="Put Block size cap in MiB (default 4000, as Azure)")
    a("--multipart-max-bytes", type=int, default=1_000_000_000,
      help="multipart file size cap (default 1000000000: awork's 1 GB)")
    a("--access-log", action="store_true", help="log every request to stderr")
    a("--no-uvloop", action="store_true",
      help="use asyncio's default event loop even when uvloop is installed")


def _parse_keys(values: list[str], where: str = "--api-key") -> dict[str, str]:
    keys: dict[str, str] = {}
    for v in values:
        key, sep, ws = v.strip().partition("=")
        if not key:
            raise SystemExit(f"{where}: an entry has an empty key")
        keys[key] = ws if sep and ws else "default"
    return keys


def keys_from_env(environ: Mapping[str, str]) -> dict[str, str]:
    """AWORK_SANDBOX_API_KEY: comma-separated KEY[=WORKSPACE] (blank entries skipped)."""
    raw = environ.get(KEYS_ENV, "")
    return _parse_keys([item for item in raw.split(",") if item.strip()], KEYS_ENV)


def _parse_clients(values: list[str]) -> dict[str, str]:
    clients: dict[str, str] = {}
    for v in values:
        cid, sep, secret = v.partition(":")
        if not cid or not sep or not secret:
            raise SystemExit(f"--oauth-client {v!r}: expected ID:SECRET")
        clients[cid] = secret
    return clients


def settings_from_args(args: argparse.Namespace) -> Settings:
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    workspaces: dict[str, Limits] = {}
    for spec in args.workspace_rate_limit:
        ws, sep, limits = spec.partition("=")
        per_min, _, per_sec = limits.partition("/")
        try:
            workspaces[ws] = Limits(
                per_minute=int(per_min),
                per_second=int(per_sec) if per_sec else args.rate_limit_per_second,
            )
        except ValueError:
            raise SystemExit(f"--workspace-rate-limit {spec!r}: expected WS=PER_MIN[/PER_SEC]") from None
        if not sep or not ws:
            raise SystemExit(f"--workspace-rate-limit {spec!r}: expected WS=PER_MIN[/PER_SEC]")
    base = Settings(
        seed=seed,
        rate_limits=Limits(args.rate_limit_per_minute, args.rate_limit_per_second),
        workspace_limits=workspaces,
        retry_after_header=args.retry_after,
        put_blob_max_bytes=args.put_blob_max_mib * MIB,
        put_block_max_bytes=args.put_block_max_mib * MIB,
        multipart_max_bytes=args.multipart_max_bytes,
    )
    routes: dict[str, dict[str, float]] = {}
    for spec in args.fault:
        try:
            route, rest = spec.split(":", 1)
            kind, p = rest.split("=", 1)
            routes.setdefault(route, {})[kind] = float(p)
        except ValueError:
            raise SystemExit(f"--fault {spec!r}: expected ROUTE:KIND=PROBABILITY") from None
    patch: dict[str, Any] = {
        "latency_ms": args.latency_ms,
        "jitter_ms": args.jitter_ms,
        "window_kib": args.window_kib,
        "upload_url_lifetime_s": args.upload_url_lifetime,
        "upload_url_permissions": args.upload_url_permissions,
        "duplicate_on_relink": args.duplicate_on_relink,
        "routes": routes,
    }
    try:
        settings = base.patched(patch)
        if args.faults_json:
            text = args.faults_json
            if text.startswith("@"):
                text = Path(text[1:]).read_text()
            settings = settings.patched(json.loads(text))
    except (ValueError, OSError) as exc:
        raise SystemExit(f"sandbox settings: {exc}") from None
    return settings


def seed_demo(sandbox: Sandbox, seed: int) -> dict[str, list[str]]:
    """A few entities of each type, with ids that depend only on the seed."""
    rng = random.Random(f"{seed}/demo")
    out: dict[str, list[str]] = {}
    for etype in sandbox.state.entities:
        ids = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(DEMO_PER_TYPE)]
        for i in ids:
            sandbox.state.entities[etype][i] = None
        out[etype] = ids
    return out


def _run(coro: Coroutine[Any, Any, None], use_uvloop: bool) -> None:
    """uvloop when installed: about twice the small-request rate of asyncio's own loop."""
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            uvloop.run(coro)
            return
    asyncio.run(coro)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = settings_from_args(args)
    extra: list[str] = [f"SANDBOX_SEED={settings.seed}"]
    keys = {**keys_from_env(os.environ), **_parse_keys(args.api_key)}
    if not keys:
        generated = f"sandbox-{secrets.token_hex(12)}"
        keys = {generated: "default"}
        extra.append(f"{KEYS_ENV}={generated}")
    admin_token = args.admin_token or os.environ.get(ADMIN_TOKEN_ENV, "").strip()
    if not admin_token:
        admin_token = secrets.token_hex(16)
        extra.append(f"SANDBOX_ADMIN_TOKEN={admin_token}")
    temp_dir: str | None = None
    data_dir = args.data_dir
    if data_dir is None:
        temp_dir = tempfile.mkdtemp(prefix="awork-sandbox-")
        data_dir = Path(temp_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    extra.append(f"SANDBOX_DATA_DIR={data_dir.resolve()}")
    if args.access_log:
        import logging

        logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    config = SandboxConfig(
        host=args.host, port=args.port, blob_port=args.blob_port, public_host=args.public_host,
        api_keys=keys, admin_token=admin_token, data_dir=data_dir, access_log=args.access_log,
        oauth_clients=_parse_clients(args.oauth_client),
        oauth_access_lifetime_s=args.oauth_access_lifetime,
    )
    try:
        sandbox = Sandbox(config, settings)
        entities = seed_demo(sandbox, settings.seed) if args.seed_demo else None
        coro = serve(sandbox, lambda sb: print_ready(sb, entities, extra))
        try:
            _run(coro, use_uvloop=not args.no_uvloop)
        except OSError as exc:
            print(f"sandbox: cannot listen: {exc}", file=sys.stderr)
            return 1
        print("sandbox: stopped", file=sys.stderr, flush=True)
        return 0
    finally:
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)
