"""`awork-uploads workspaces [NAME...] [--json]`: each workspace's rate limits, use and pause.

Reads the fleet-wide limiter's state in Redis (`RateLimiter.snapshot`); needs REDIS_URL but no
API key. Workspaces shown: the names in AWORK_WORKSPACES_FILE (else `default`), plus any name a
running worker announced, or just the NAMEs given. Limits come from the same configuration the
workers read (`workers.limits_config`: the workspace's table, and for `default` the
AWORK_RATE_LIMIT_* variables of THIS shell): run it with the workers' environment.

Per workspace:
  limit       awork's limits as configured (per minute / per second) and the margin;
  effective   what the limiter enforces now: floor(limit * margin), or awork's advertised limits
              (`learned`, from x-ratelimit-limit-* headers) with the margin when those are lower;
  used        grants in the last 60 s / 1 s (the fleet's own requests plus outside usage);
  outside     of those, requests by other clients of the workspace learned from awork's
              x-ratelimit-remaining-* headers;
  pause       until when the whole workspace is stopped after a 429, and why;
  waiting     transfers waiting for a slot in the fleet, plus those on their way (a generate
              step just finished): `waiting_for_slot` and `expected` in --json;
  in flight   transfers running or dispatched into a slot;
  share       the slots its fair share allows now, of the fleet's transfer slots, and its
              weight (workers/fair_share.py): `share_slots`, `capacity`, `weight` in --json.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from producers.config import DEFAULT_WORKSPACE, ConfigError, SharedSettings, read_workspaces_file
from producers.redis_conn import redis_client

EXIT_OK, EXIT_FAILED = 0, 1


def workspace_tables(settings: SharedSettings) -> dict[str, dict[str, object]]:
    """name -> its table in AWORK_WORKSPACES_FILE, or {"default": {}} without a file."""
    if settings.workspaces_file is None:
        return {DEFAULT_WORKSPACE: {}}
    return read_workspaces_file(settings.workspaces_file)


def collect(
    client: Any, tables: dict[str, dict[str, object]], names: Sequence[str] = ()
) -> list[dict[str, Any]]:
    """One row per workspace: its snapshot plus derived fields (`paused`, `pause_seconds_left`)."""
    from producers.keys import WORKSPACES_KEY
    from workers.fair_share import FairShare, check_share
    from workers.limits_config import limits_for_workspace
    from workers.ratelimit import RateLimiter

    fair = {s.workspace: s for s in FairShare(client, lease_seconds=60).snapshot()}
    wanted = list(names)
    if not wanted:
        announced = {m.decode() if isinstance(m, bytes) else str(m) for m in client.smembers(WORKSPACES_KEY)}
        wanted = sorted(set(tables) | announced | set(fair))
    limiter = RateLimiter(client)
    rows: list[dict[str, Any]] = []
    for name in wanted:
        limits = limits_for_workspace(name, tables.get(name))
        snap = limiter.snapshot(name, limits)
        until = snap["paused_until"]
        left = max(0.0, until - snap["server_time"]) if until is not None else 0.0
        snap["paused"] = until is not None and left > 0
        snap["pause_seconds_left"] = round(left, 3)
        snap["configured"] = name in tables
        share = fair.get(name)
        snap["waiting_for_slot"] = share.waiting if share else 0
        snap["expected"] = share.expected if share else 0
        snap["in_flight"] = share.in_flight if share else 0
        snap["share_slots"] = share.slots if share else None
        snap["capacity"] = share.capacity if share else None
        snap["weight"] = share.weight if share else check_share(tables.get(name, {}).get("share"), name)
        rows.append(snap)
    return rows


def _limit_text(per_minute: int | None, per_second: int | None) -> str:
    if per_minute is None and per_second is None:
        return "-"
    m = "?" if per_minute is None else per_minute
    s = "?" if per_second is None else per_second
    return f"{m}/min {s}/s"


def _share_text(r: dict[str, Any]) -> str:
    weight = f"x{r['weight']:g}"
    if r["share_slots"] is None:
        return f"- ({weight})"
    return f"{r['share_slots']}/{r['capacity']} slots ({weight})"


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    header = (
        *("WORKSPACE", "LIMIT", "MARGIN", "EFFECTIVE", "LEARNED"),
        *("USED 60s/1s", "OUTSIDE 60s/1s", "PAUSE", "WAITING", "IN FLIGHT", "SHARE"),
    )
    lines = [header]
    for r in rows:
        if r["paused"]:
            when = datetime.fromtimestamp(r["paused_until"]).strftime("%H:%M:%S")
            pause = f"until {when} ({r['pause_seconds_left']:.1f} s, {r['pause_reason'] or '?'})"
        else:
            pause = "-"
        lines.append(
            (
                r["workspace"] + ("" if r["configured"] else " *"),
                _limit_text(r["configured_per_minute"], r["configured_per_second"]),
                f"{r['margin']:g}",
                _limit_text(r["effective_per_minute"], r["effective_per_second"]),
                _limit_text(r["learned_per_minute"], r["learned_per_second"]),
                f"{r['used_last_minute']}/{r['used_last_second']}",
                f"{r['outside_last_minute']}/{r['outside_last_second']}",
                pause,
                str(r["waiting_for_slot"] + r["expected"]),
                str(r["in_flight"]),
                _share_text(r),
            )
        )
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines]
    if any(not r["configured"] for r in rows):
        out.append("* not in the workspaces configuration (announced by a worker, or named): plan defaults")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="awork-uploads workspaces",
        description="Show each workspace's rate limits, current use and pause (from the shared limiter).",
    )
    parser.add_argument("names", nargs="*", metavar="NAME", help="only these workspaces")
    parser.add_argument("--json", action="store_true", help="one JSON object per workspace per line")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))

    import redis

    from producers.config import redact_url

    settings = SharedSettings.from_env()
    tables = workspace_tables(settings)
    client = redis_client(settings.redis_url, socket_connect_timeout=5, socket_timeout=10)
    try:
        rows = collect(client, tables, args.names)
    except redis.exceptions.ConnectionError as exc:
        print(
            f"awork-uploads: error: cannot reach Redis at {redact_url(settings.redis_url)}: {exc}",
            file=sys.stderr,
        )
        return EXIT_FAILED
    except ValueError as exc:  # a bad workspace name or limits (ConfigError is a ValueError)
        if isinstance(exc, ConfigError):
            raise
        print(f"awork-uploads: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        client.close()
    if args.json:
        for row in rows:
            print(json.dumps(row, sort_keys=True))
    else:
        print(format_table(rows))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
