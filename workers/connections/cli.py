"""`awork-uploads connections ...`: add, list, show, test, remove, rekey, oauth-url, oauth-complete.

Commands that read or write secrets (add, test, rekey, oauth-*) need AWORK_SECRETS_KEY; list and
show print names, kinds and states only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import redis

from producers.config import ConfigError
from producers.connections import ConnectionInfo, ConnectionRegistry, check_name
from producers.contract import JobState, SpecError
from producers.job_record import read
from producers.keys import ACTIVE_KEY
from producers.records import JobStore
from workers.api_url import api_url_from_env, insecure_api_allowed
from workers.command_run import EXIT_FAILED, EXIT_OK, command_redis, run_command
from workers.connections.crypto import SecretBox
from workers.connections.oauth import (
    OAuthClient,
    begin_authorization,
    complete_authorization,
    oauth_client_from_env,
)
from workers.connections.store import PLAN_FIELDS, ConnectionStore, remove_connection
from workers.connections.tokens import Connections, UnknownConnection
from workers.secret_files import read_secret_file

REMOVED_CODE = "connection-removed"


def _api_url() -> str:
    """Where the commands send client secret and tokens: checked as the workers check it."""
    return api_url_from_env(insecure_api_allowed())


def _store(client: redis.Redis) -> ConnectionStore:
    return ConnectionStore(client, SecretBox.from_env())


def _limits(args: argparse.Namespace) -> dict[str, object] | None:
    table = {
        k: getattr(args, k)
        for k in PLAN_FIELDS
        if getattr(args, k, None) is not None
    }
    return table or None


def _not_registered(name: str) -> int:
    print(f"awork-uploads: error: connection {name!r} is not registered", file=sys.stderr)
    return EXIT_FAILED


def _print(info: ConnectionInfo, as_json: bool) -> None:
    if as_json:
        print(json.dumps(info.to_json()))
        return
    expires = ""
    if info.access_expires_at:
        expires = f"  token expires in {max(0, int(info.access_expires_at - time.time()))}s"
    limits = info.plan + (f" {info.per_minute}/min" if info.per_minute else "")
    reason = f" ({info.reason})" if info.reason else ""
    print(f"{info.name}  {info.kind}  {info.state}{reason}  {limits}  refreshes={info.refreshes}{expires}")


def cmd_add(args: argparse.Namespace) -> int:
    check_name(args.name)
    client = command_redis()
    store = _store(client)
    if args.oauth:
        if not args.refresh_token_file:
            raise SpecError("refresh_token_file", "--oauth needs --refresh-token-file PATH")
        token = read_secret_file("--refresh-token-file", Path(args.refresh_token_file))
        info = store.add_oauth(args.name, token, limits=_limits(args))
    else:
        if bool(args.api_key_file) == bool(args.api_key_env):
            raise SpecError("api_key", "give one of --api-key-file PATH, --api-key-env VAR, or --oauth")
        if args.api_key_file:
            key = read_secret_file("--api-key-file", Path(args.api_key_file))
        else:
            key = os.environ.get(args.api_key_env, "").strip()
            if not key:
                raise ConfigError(f"--api-key-env: environment variable {args.api_key_env} is not set")
        info = store.add_api_key(args.name, key, limits=_limits(args))
    _print(info, args.json)
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    for info in ConnectionRegistry(command_redis()).list():
        _print(info, args.json)
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    info = ConnectionRegistry(command_redis()).get(args.name)
    if info is None:
        return _not_registered(args.name)
    _print(info, args.json)
    return EXIT_OK


def cmd_test(args: argparse.Namespace) -> int:
    """One cheap authenticated call (GET /me), refreshing an OAuth token first if it is due."""
    import requests

    conns = Connections(_store(command_redis()), oauth_client_from_env(_api_url()), ttl=0)
    try:
        token = conns.bearer(args.name)
    except UnknownConnection:
        return _not_registered(args.name)
    except Exception as exc:  # NeedsReconnect, a refused refresh: say it, name the connection
        print(f"{args.name}: failed: {exc}")
        return EXIT_FAILED
    url = f"{_api_url()}/me"
    resp = requests.get(url, headers={"Authorization": f"Bearer {token.reveal()}"}, timeout=(10, 30))
    ok = resp.status_code == 200
    print(f"{args.name}: {'ok' if ok else 'failed'} (GET /me: HTTP {resp.status_code})")
    return EXIT_OK if ok else EXIT_FAILED


def active_jobs(client: redis.Redis, name: str) -> list[str]:
    """Unfinished jobs of the connection (the sweeper's list of active jobs, filtered)."""
    store = JobStore(client)
    ids = [i.decode() if isinstance(i, bytes) else str(i) for i in client.zrange(ACTIVE_KEY, 0, -1)]
    out = []
    for job_id, raw in zip(ids, store.get_many(ids), strict=True):
        rec = read(job_id, raw)
        if rec is not None and rec.workspace == name and not rec.finished:
            out.append(job_id)
    return out


def cmd_remove(args: argparse.Namespace) -> int:
    client = command_redis()
    registry = ConnectionRegistry(client)
    if registry.get(args.name) is None:
        return _not_registered(args.name)
    jobs = active_jobs(client, args.name)
    if jobs and not args.force:
        print(
            f"awork-uploads: error: connection {args.name!r} has {len(jobs)} active job(s); "
            "wait for them, or pass --force to fail them",
            file=sys.stderr,
        )
        return EXIT_FAILED
    store = JobStore(client)
    for job_id in jobs:
        store.finish(
            job_id,
            JobState.FAILED,
            notify=True,  # its callbacks, if any, are announced by the sweeper
            error_code=REMOVED_CODE,
            error_description=f"connection {args.name!r} was removed while the job was active",
        )
    remove_connection(client, args.name)
    print(
        json.dumps({"removed": args.name, "failed_jobs": len(jobs)})
        if args.json
        else f"removed {args.name} ({len(jobs)} active job(s) failed with {REMOVED_CODE})"
    )
    return EXIT_OK


def cmd_rekey(args: argparse.Namespace) -> int:
    count = _store(command_redis()).rekey()
    print(
        json.dumps({"reencrypted": count})
        if args.json
        else f"re-encrypted {count} secret(s) under the first key"
    )
    return EXIT_OK


def cmd_oauth_url(args: argparse.Namespace) -> int:
    url = begin_authorization(
        _store(command_redis()), OAuthClient.from_env(_api_url()), args.name, args.redirect_uri, _limits(args)
    )
    print(url)
    return EXIT_OK


def cmd_oauth_complete(args: argparse.Namespace) -> int:
    info = complete_authorization(
        _store(command_redis()), OAuthClient.from_env(_api_url()), args.name, args.code, args.state
    )
    _print(info, args.json)
    return EXIT_OK


def _plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plan", help="standard (default) or enterprise")
    p.add_argument("--per-minute", type=int)
    p.add_argument("--per-second", type=int)
    p.add_argument("--margin", type=float)
    p.add_argument("--share", type=float, help="weight in the fleet's transfer slots (default 1)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="awork-uploads connections", description="customer workspaces")
    sub = parser.add_subparsers(dest="action", required=True)

    p = sub.add_parser("add", help="register (or replace) a connection's credentials")
    p.add_argument("name")
    p.add_argument("--api-key-file", metavar="PATH")
    p.add_argument("--api-key-env", metavar="VAR")
    p.add_argument("--oauth", action="store_true", help="an OAuth grant obtained elsewhere")
    p.add_argument("--refresh-token-file", metavar="PATH")
    _plan_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_add)

    p = sub.add_parser("list", help="every connection: kind, state, limits")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("show", help="one connection")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("test", help="one cheap authenticated call")
    p.add_argument("name")
    p.set_defaults(func=cmd_test)

    p = sub.add_parser("remove", help="forget a connection")
    p.add_argument("name")
    p.add_argument("--force", action="store_true", help=f"fail its active jobs ({REMOVED_CODE})")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_remove)

    p = sub.add_parser("rekey", help="re-encrypt every secret under the first AWORK_SECRETS_KEY")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_rekey)

    p = sub.add_parser("oauth-url", help="print the authorize URL for a customer")
    p.add_argument("name")
    p.add_argument("--redirect-uri", required=True)
    _plan_args(p)
    p.set_defaults(func=cmd_oauth_url)

    p = sub.add_parser("oauth-complete", help="exchange the code the customer came back with")
    p.add_argument("name")
    p.add_argument("--code", required=True)
    p.add_argument("--state", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_oauth_complete)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser().parse_args(list(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    sys.exit(main())
