"""How the operator commands that hold the secrets key (`connections`, `api-tokens`) end: one
line on stderr that names the problem (never a secret: Redis errors by class only) and an
exit status."""

from __future__ import annotations

import argparse
import sys

import redis

from producers.config import ConfigError, SharedSettings
from producers.contract import SpecError
from producers.redis_conn import redis_client
from workers.errors import AworkError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def command_redis() -> redis.Redis:
    """The fleet's Redis (REDIS_URL) with short timeouts: a command waits seconds, not minutes."""
    return redis_client(
        SharedSettings.from_env().redis_url, socket_connect_timeout=3, socket_timeout=10
    )


def run_command(args: argparse.Namespace) -> int:
    """Run the parsed command (`args.func`); bad input and an unreachable Redis are usage errors."""
    try:
        return int(args.func(args))
    except (SpecError, ConfigError) as exc:
        print(f"awork-uploads: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except AworkError as exc:
        print(f"awork-uploads: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except redis.RedisError as exc:
        print(f"awork-uploads: error: Redis: {type(exc).__name__}", file=sys.stderr)
        return EXIT_USAGE
