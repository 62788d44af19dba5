"""The producer commands of `awork-uploads`: enqueue, sync, status, jobs, cancel, dead.

They need the base install only (Redis and the Celery client, no worker code). The
`awork-uploads` entry point (ops/cli.py) adds the operator commands (worker, stack, demo,
sandbox, flower, ...); `python -m producers.cli` runs the producer commands alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from producers.config import ConfigError
from producers.contract import SpecError
from producers.records import Job

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def job_json(job: Job) -> str:
    err = job.error
    return json.dumps(
        {
            "id": job.id,
            "state": job.state.value,
            "workspace": job.workspace,
            "target": job.target,
            "file_name": job.file_name,
            "size": job.size,
            "bytes_sent": job.bytes_sent,
            "file_id": job.file_id,
            "created": job.created,
            "outcome": job.outcome,
            "batch_id": job.batch_id,
            "cancel_requested": job.cancel_requested,
            "priority": job.priority,
            "wait_reason": job.wait_reason,
            "wait_until": job.wait_until,
            "error": None
            if err is None
            else {
                "step": err.step,
                "code": err.code,
                "description": err.description,
                "status": err.status,
                "trace_id": err.trace_id,
            },
        }
    )


def _print_jobs(jobs: Sequence[Job], as_json: bool) -> None:
    from producers.progress import job_line

    for job in jobs:
        print(job_json(job) if as_json else f"{job.id}  {job_line(job)}", flush=True)


def cmd_enqueue(args: argparse.Namespace) -> int:
    from producers.client import Uploads
    from producers.progress import ProgressDisplay
    from producers.spec import JobSpec

    if args.name and len(args.paths) > 1:
        raise SpecError("name", "--name applies to one file; give one PATH")
    if args.idempotency_key and len(args.paths) > 1:
        raise SpecError("idempotency_key", "--idempotency-key applies to one file; give one PATH")
    if args.new_version_of and len(args.paths) > 1:
        raise SpecError("new_version_of", "--new-version-of applies to one file; give one PATH")
    specs = [
        JobSpec(
            source=p if p.lower().startswith(("http://", "https://")) else Path(p),
            to=args.to,
            workspace=args.workspace,
            name=args.name,
            description=args.description,
            idempotency_key=args.idempotency_key,
            content_type=args.content_type,
            on_existing=args.on_existing,
            new_version_of=args.new_version_of,
            via=args.via,
            priority=args.priority,
        )
        for p in args.paths
    ]
    with Uploads.from_env() as up:
        jobs = up.enqueue_many(specs)
        if not args.wait:
            _print_jobs(jobs, args.json)
            return EXIT_OK
        display = None if args.json else ProgressDisplay()
        final = up.wait_many(
            [j.id for j in jobs],
            timeout=args.timeout,
            on_update=display.update if display else None,
        )
        _print_jobs(final, args.json)
        return EXIT_OK if all(j.state.value == "done" for j in final) else EXIT_FAILED


def cmd_status(args: argparse.Namespace) -> int:
    from producers.client import Uploads

    with Uploads.from_env() as up:
        jobs = up.statuses(args.jobs)
    _print_jobs(jobs, args.json)
    return EXIT_OK


def cmd_jobs(args: argparse.Namespace) -> int:
    from producers.client import Uploads

    with Uploads.from_env() as up:
        jobs = up.jobs(state=args.state, limit=args.limit)
    _print_jobs(jobs, args.json)
    return EXIT_OK


def cmd_dead(args: argparse.Namespace) -> int:
    """Dead letters: list, retry from the failed step, purge old ones."""
    from producers.client import Uploads
    from producers.dead_letters import DeadLetters, parse_duration

    with Uploads.from_env() as up:
        dead = DeadLetters(up)
        if args.action == "list":
            _print_jobs(dead.jobs(), args.json)
        elif args.action == "retry":
            if not args.all and not args.jobs:
                raise SpecError("jobs", "name JOB ids or pass --all")
            _print_jobs(dead.retry_all() if args.all else dead.retry(args.jobs), args.json)
        else:
            if not args.older_than:
                raise SpecError("older_than", "purge needs --older-than DURATION (e.g. 7d)")
            try:
                seconds = parse_duration(args.older_than)
            except ValueError as exc:
                raise SpecError("older_than", str(exc)) from None
            count = dead.purge(seconds)
            print(json.dumps({"purged": count}) if args.json else f"purged {count} dead letter(s)")
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    """Cancel jobs: at once when no step runs, else at the running step's next block or fence."""
    from producers.cancel import CancelRefused
    from producers.client import Uploads

    with Uploads.from_env() as up:
        failed = False
        for job_id in args.jobs:
            try:
                _print_jobs(up.cancel([job_id]), args.json)
            except CancelRefused as exc:
                fail(exc)
                failed = True
    return EXIT_FAILED if failed else EXIT_OK


def _add_enqueue(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("enqueue", help="upload files to an awork entity")
    p.add_argument("paths", nargs="+", metavar="PATH", help="local files or http(s) URLs")
    p.add_argument("--to", required=True, metavar="KIND:ID", help="task:<id>, image:projects/<id>, ...")
    p.add_argument("--workspace", default="default")
    p.add_argument("--name", help="the file name in awork (one PATH only)")
    p.add_argument("--description")
    p.add_argument("--idempotency-key", help="the same key returns the same job (one PATH only)")
    p.add_argument("--content-type")
    p.add_argument(
        "--on-existing",
        choices=["new", "version", "skip"],
        default="new",
        help="a file of that name is there: add another (new, default), a new version of it, or skip",
    )
    p.add_argument("--new-version-of", metavar="FILE_ID", help="a new version of this awork file")
    p.add_argument(
        "--via",
        choices=["workers", "awork"],
        default="workers",
        help="awork: awork fetches the (public, <= 100 MB) URL itself; workers (default) stream it",
    )
    p.add_argument(
        "--priority",
        default="normal",
        help="high, normal (default) or bulk: order among this workspace's jobs, never above its share",
    )
    p.add_argument("--wait", action="store_true", help="show progress until every job ends")
    p.add_argument("--timeout", type=float, default=None, help="with --wait: give up after SECONDS")
    p.add_argument("--json", action="store_true", help="one JSON object per job per line")
    p.set_defaults(func=cmd_enqueue)


def _add_job_commands(sub: argparse._SubParsersAction) -> None:
    """status, jobs, cancel and dead: commands on jobs already enqueued."""
    p = sub.add_parser("status", help="show jobs by id")
    p.add_argument("jobs", nargs="+", metavar="JOB")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("jobs", help="list recent jobs")
    p.add_argument(
        "--state",
        help="queued, requesting_url, uploading, linking, waiting_for_connection, "
        "done, failed, dead, canceled",
    )
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser("cancel", help="cancel jobs (a linked job cannot be canceled)")
    p.add_argument("jobs", nargs="+", metavar="JOB")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("dead", help="dead letters: list, retry, purge failed and dead jobs")
    p.add_argument("action", choices=["list", "retry", "purge"])
    p.add_argument("jobs", nargs="*", metavar="JOB", help="with retry: the jobs to re-drive")
    p.add_argument("--all", action="store_true", help="with retry: every dead letter")
    p.add_argument("--older-than", metavar="DURATION", help="with purge: e.g. 7d, 12h, 30m")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_dead)


def add_commands(sub: argparse._SubParsersAction) -> None:
    """The producer commands, in the order `awork-uploads --help` lists them."""
    from producers.sync_cli import add_parser as add_sync_parser

    _add_enqueue(sub)
    add_sync_parser(sub)
    _add_job_commands(sub)


def root_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    parser = argparse.ArgumentParser(
        prog="awork-uploads", description="Get files into awork through a Celery fleet."
    )
    return parser, parser.add_subparsers(dest="command", required=True)


def build_parser() -> argparse.ArgumentParser:
    """The producer commands alone (ops.cli.build_parser adds the operator commands)."""
    parser, sub = root_parser()
    add_commands(sub)
    return parser


def fail(exc: BaseException, what: str = "error") -> None:
    print(f"awork-uploads: {what}: {exc}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    """Run a parsed command; a known failure is one line on stderr and an exit code."""
    from producers.client import JobNotFound, RedisUnavailable

    try:
        return int(args.func(args))
    except (SpecError, ConfigError, RedisUnavailable) as exc:
        fail(exc)
        return EXIT_USAGE
    except (JobNotFound, ValueError) as exc:
        fail(exc)
        return EXIT_FAILED
    except TimeoutError as exc:
        fail(exc, "timeout")
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(list(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    sys.exit(main())
