"""`awork-uploads`: the one entry point, producer and operator commands alike.

Producer commands (enqueue, sync, status, jobs, cancel, dead) live in producers/cli.py and need
the base install only. Operator commands (worker, stack, demo, sandbox, flower, workspaces,
connections, api-tokens, api) live with the code they run; each is imported only when called,
so `awork-uploads enqueue` never loads Flower, aiohttp or the sandbox, which a producer's
install may not have.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from producers.cli import EXIT_OK, EXIT_USAGE, add_commands, fail, root_parser, run
from producers.config import ConfigError, SharedSettings

QUEUES = "awork.api,awork.transfer,awork.callbacks"


def _sandbox(argv: list[str]) -> int:
    from ops.sandbox.cli import main

    return int(main(argv))


def _stack(argv: list[str]) -> int:
    from ops.stack import main

    return int(main(argv))


def _demo(argv: list[str]) -> int:
    from ops.demo import main

    return int(main(argv))


def _flower(argv: list[str]) -> int:
    from ops.flower import main

    return int(main(argv))


def _workspaces(argv: list[str]) -> int:
    from ops.workspaces import main

    return int(main(argv))


def _connections(argv: list[str]) -> int:
    from workers.connections.cli import main

    return int(main(argv))


def _api_tokens(argv: list[str]) -> int:
    from workers.api_tokens_cli import main

    return int(main(argv))


def _api(argv: list[str]) -> int:
    from producers.intake.server import main

    return int(main(argv))


# Commands that parse their own flags: name -> (run with the rest of argv, help).
OPS_COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "sandbox": (_sandbox, "run the awork sandbox (see ops/sandbox/README.md)"),
    "stack": (_stack, "run Redis, the sandbox, workers and Flower on this machine"),
    "demo": (_demo, "start the stack and send a realistic batch through it"),
    "flower": (_flower, "run Flower with basic auth from FLOWER_BASIC_AUTH"),
    "workspaces": (_workspaces, "each workspace's rate limits, current use and pause [--json]"),
    "connections": (
        _connections,
        "customer workspaces: add, list, show, test, remove, rekey, oauth-url, oauth-complete",
    ),
    "api-tokens": (_api_tokens, "tokens of client applications of the HTTP API: create, list, revoke"),
    "api": (_api, "run the HTTP intake (needs the `api` extra)"),
}


def cmd_worker(args: argparse.Namespace) -> int:
    """Exec `celery -A workers worker` with defaults that fit this workload."""
    SharedSettings.from_env()  # a missing or malformed REDIS_URL: one line here, not a traceback
    argv = [
        sys.executable, "-m", "celery", "-A", "workers", "worker",
        "--pool", args.pool, "--concurrency", str(args.concurrency), "--queues", args.queues,
        "--loglevel", args.loglevel, "--without-mingle", "--without-gossip",
        *args.celery_args,
    ]  # fmt: skip
    if args.hostname:
        argv += ["--hostname", args.hostname]
    if args.shutdown_grace is not None:
        # read by the worker's Celery config (producers.broker) and its shutdown watchdog
        os.environ["AWORK_SHUTDOWN_GRACE"] = str(args.shutdown_grace)
    os.execv(sys.executable, argv)
    return EXIT_OK  # not reached


def _add_worker(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("worker", help="run a worker (celery -A workers worker with good defaults)")
    p.add_argument("--pool", default="threads", help="threads (default) fits blocking HTTP")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--queues", default=QUEUES)
    p.add_argument("--loglevel", default="INFO")
    p.add_argument("--hostname")
    p.add_argument(
        "--shutdown-grace",
        type=float,
        metavar="SECONDS",
        help="on SIGTERM, running steps get this long to finish before they go back to the queue "
        "(default: AWORK_SHUTDOWN_GRACE, else 60)",
    )
    p.add_argument("celery_args", nargs=argparse.REMAINDER, help="more celery worker options")
    p.set_defaults(func=cmd_worker)


def _passthrough(args: argparse.Namespace) -> int:
    return run_ops_command(args.command, args.rest)


def build_parser() -> argparse.ArgumentParser:
    """Every command; the operator commands' own flags are parsed by the commands themselves."""
    parser, sub = root_parser()
    add_commands(sub)
    _add_worker(sub)
    for name, (_, text) in OPS_COMMANDS.items():
        p = sub.add_parser(name, help=text, add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=_passthrough)
    return parser


def run_ops_command(command: str, rest: list[str]) -> int:
    from producers.client import RedisUnavailable

    try:
        return OPS_COMMANDS[command][0](rest)
    except (ConfigError, RedisUnavailable) as exc:
        fail(exc)
        return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in OPS_COMMANDS:
        return run_ops_command(argv[0], argv[1:])
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
