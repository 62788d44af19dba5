"""`awork-uploads sync DIR --to KIND:ID`: the command line of producers.sync.

`--watch` syncs again whenever files in DIR change (inotify through watchfiles, from the
optional `sync` extra), with changes gathered for `--debounce` milliseconds first so a file
being written is sent once it has settled, not once per write.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from producers.contract import SpecError

if TYPE_CHECKING:
    from producers.sync import FolderSync

EXIT_OK, EXIT_FAILED = 0, 1
DEFAULT_DEBOUNCE_MS = 1000
WATCH_SETTLE_SECONDS = 0.2  # lets the watcher thread register with inotify before the first scan


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("sync", help="one-way sync of a folder to an entity (new files, new versions)")
    p.add_argument("folder", metavar="DIR")
    p.add_argument("--to", required=True, metavar="KIND:ID", help="task:<id>, project:<id>, ...")
    p.add_argument("--workspace", default="default")
    p.add_argument(
        "--delete-missing",
        default="no",
        metavar="no",
        help="files deleted locally stay in awork: 'no' is the only mode",
    )
    p.add_argument("--dry-run", action="store_true", help="print the plan, enqueue nothing")
    p.add_argument("--watch", action="store_true", help="keep syncing as files change (Ctrl-C stops)")
    p.add_argument("--debounce", type=int, default=DEFAULT_DEBOUNCE_MS, metavar="MS",
                   help=f"with --watch: gather changes this long first (default {DEFAULT_DEBOUNCE_MS})")
    p.add_argument("--timeout", type=float, default=None,
                   help="give up waiting for a run's jobs after SECONDS")
    p.add_argument("--json", action="store_true", help="a JSON summary line per run")
    p.set_defaults(func=cmd_sync)


def cmd_sync(args: argparse.Namespace, stop: threading.Event | None = None) -> int:
    from producers.client import Uploads
    from producers.sync import FolderSync

    if args.delete_missing != "no":
        raise SpecError("delete_missing", "only 'no' is supported: sync never deletes files in awork")
    if args.watch and args.dry_run:
        raise SpecError("dry_run", "--dry-run prints one plan; it does not combine with --watch")
    if args.watch:
        _watcher()  # a missing watchfiles fails here, before anything is sent
    with Uploads.from_env() as up:
        sync = FolderSync(up, Path(args.folder), args.to, args.workspace, timeout=args.timeout)
        if not args.watch:
            return _once(sync, args)
        # Watching starts before the first run, so a file written while a run waits for its
        # jobs is seen by the next run rather than missed.
        stop = stop or threading.Event()
        changed = threading.Event()
        watcher = threading.Thread(
            target=_watch, args=(sync.folder, args.debounce, changed, stop), name="sync-watch", daemon=True
        )
        watcher.start()
        time.sleep(WATCH_SETTLE_SECONDS)
        code = _once(sync, args)
        try:
            while not stop.is_set() and watcher.is_alive():
                if changed.wait(timeout=1.0):
                    changed.clear()
                    code = _once(sync, args)
        finally:
            stop.set()
        return code


def _watch(folder: Path, debounce_ms: int, changed: threading.Event, stop: threading.Event) -> None:
    """Set `changed` after each debounced batch of changes in `folder` until `stop`."""
    for _changes in _watcher()(folder, debounce=debounce_ms, recursive=False, stop_event=stop,
                               raise_interrupt=False):
        changed.set()


def _once(sync: FolderSync, args: argparse.Namespace) -> int:
    result = sync.run(dry_run=args.dry_run)
    summary = result.summary()
    if args.json:
        print(json.dumps(summary), flush=True)
    else:
        print(", ".join(f"{k} {v}" for k, v in summary.items()), flush=True)
    return EXIT_FAILED if result.failed else EXIT_OK


def _watcher() -> Callable[..., Iterator[set[tuple[Any, str]]]]:
    try:
        from watchfiles import watch
    except ImportError:
        raise SpecError(
            "watch", "needs the watchfiles package: pip install 'awork-uploads[sync]'"
        ) from None
    return watch
