"""`awork-uploads api-tokens create|list|revoke`: tokens of the client applications that call
the HTTP intake (producers.api_tokens).

It lives on the workers' side because `create` seals each token's callback signing secret under
AWORK_SECRETS_KEY (workers.connections.crypto), like `connections add`: run it where that key
is. The token and the callback secret are printed once and never again.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from producers.api_tokens import DEFAULT_RATE_PER_SECOND, ApiTokens
from workers.command_run import EXIT_FAILED, EXIT_OK, command_redis, run_command
from workers.connections.crypto import SecretBox


def _tokens() -> ApiTokens:
    return ApiTokens(command_redis())


def cmd_create(args: argparse.Namespace) -> int:
    box = SecretBox.from_env()
    made = _tokens().create(
        args.name, args.workspace, lambda s: box.seal({"callback_secret": s}), rate=args.rate
    )
    if args.json:
        print(
            json.dumps({**made.info.to_json(), "token": made.token, "callback_secret": made.callback_secret})
        )
    else:
        print(f"token:           {made.token}")
        print(f"callback secret: {made.callback_secret}")
        print(f"id {made.info.id}, workspaces {', '.join(made.info.workspaces)}, {made.info.rate} requests/s")
        print("Both are shown this once: store them now (Redis keeps only a hash and ciphertext).")
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    tokens = _tokens().listed()
    for t in tokens:
        print(
            json.dumps(t.to_json())
            if args.json
            else f"{t.id}  {t.name}  {','.join(t.workspaces)}  {t.rate}/s"
        )
    return EXIT_OK


def cmd_revoke(args: argparse.Namespace) -> int:
    ids = _tokens().revoke(args.token)
    if not ids:
        print(f"awork-uploads: error: no token with id or name {args.token!r}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps({"revoked": ids}) if args.json else f"revoked {', '.join(ids)}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="awork-uploads api-tokens", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("create", help="a new token; prints it and its callback secret once")
    p.add_argument("name")
    p.add_argument(
        "--workspace", action="append", default=[], help="a workspace it may enqueue into (repeat)"
    )
    p.add_argument("--rate", type=int, default=DEFAULT_RATE_PER_SECOND, help="requests per second")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_create)
    p = sub.add_parser("list", help="tokens (never their secrets)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("revoke", help="revoke by id or name")
    p.add_argument("token", metavar="ID_OR_NAME")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_revoke)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser().parse_args(list(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    sys.exit(main())
