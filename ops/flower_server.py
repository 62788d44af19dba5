"""The Flower process `awork-uploads flower` runs: read-only unless control is asked for.

Flower serves its control API to every logged-in user, and its UI buttons call it: shut down or
restart workers, grow/shrink/autoscale pools, add or cancel queue consumers, revoke, terminate
or abort tasks, change rate and time limits, and apply or send any task (`awork.put_file`
included) with any arguments. Flower has no read-only switch, so this module builds the route
table Flower serves: a route keeps its handler only when that handler is on READ_ONLY_HANDLERS
(pages and GET APIs that change nothing); every other route answers 403 and does nothing. An
allow-list, not a deny-list: a control route a newer Flower adds is refused until reviewed.

    python -m ops.flower_server [--allow-control] -A workers flower [flower options]

`--allow-control` serves Flower's own table unchanged (the operator's explicit opt-in,
`awork-uploads flower --allow-control` or AWORK_FLOWER_CONTROL=1; see ops/flower.py).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import tornado.web

ALLOW_CONTROL_FLAG = "--allow-control"
REFUSAL = (
    "Flower is read-only here: controlling workers and tasks is off. An operator can turn it on "
    "with `awork-uploads flower --allow-control` (or AWORK_FLOWER_CONTROL=1).\n"
)


class ControlRefused(tornado.web.RequestHandler):
    """403 for every method of a control route, before anything else runs."""

    def check_xsrf_cookie(self) -> None:
        """Nothing is done here, so there is nothing to forge: answer with the reason instead."""

    def prepare(self) -> None:
        self.set_status(403)
        self.set_header("Content-Type", "text/plain; charset=UTF-8")
        self.finish(REFUSAL)


def read_only_handler_classes() -> tuple[type, ...]:
    """Flower's handlers that only read: its pages, task/worker lists, metrics, login."""
    from flower.api.tasks import GetQueueLengths, ListTasks, ListTaskTypes, TaskInfo, TaskResult
    from flower.api.workers import ListWorkers
    from flower.views.auth import LoginHandler, LogoutHandler
    from flower.views.broker import BrokerView
    from flower.views.error import NotFoundErrorHandler
    from flower.views.monitor import Healthcheck, Metrics
    from flower.views.tasks import TasksDataTable, TasksView, TaskView
    from flower.views.workers import WorkersView, WorkerView

    return (
        WorkersView, WorkerView, TaskView, TasksView, TasksDataTable, BrokerView,
        ListWorkers, ListTasks, ListTaskTypes, GetQueueLengths, TaskInfo, TaskResult,
        Metrics, Healthcheck, tornado.web.StaticFileHandler, LoginHandler, LogoutHandler,
        NotFoundErrorHandler,
    )  # fmt: skip


def read_only_handlers(handlers: Sequence[Any]) -> list[Any]:
    """`handlers` (Flower's table of URLSpec or (pattern, class[, kwargs]) tuples) with every
    route whose class is not read-only pointed at ControlRefused."""
    allowed = read_only_handler_classes()
    out: list[Any] = []
    for handler in handlers:
        if isinstance(handler, tornado.web.URLSpec):
            pattern, cls = handler.regex.pattern, handler.handler_class
        else:
            pattern, cls = handler[0], handler[1]
        out.append(handler if cls in allowed else (pattern, ControlRefused))
    return out


def make_read_only() -> None:
    """Replace the table Flower's app is built from; refuse to start if it is not where we look."""
    import flower.app
    import flower.urls

    current = getattr(flower.app, "default_handlers", None)
    if current is not flower.urls.handlers or not isinstance(current, list):
        raise RuntimeError(
            "this Flower version builds its routes differently: refusing to start it without "
            "a read-only route table (ops/flower_server.py)"
        )
    flower.app.default_handlers = read_only_handlers(current)


def main(argv: Sequence[str]) -> int:
    """Make Flower read-only unless --allow-control leads `argv`, then run `celery <rest>`."""
    args = list(argv)
    allow_control = bool(args) and args[0] == ALLOW_CONTROL_FLAG
    if allow_control:
        args = args[1:]
    else:
        make_read_only()
    from celery.__main__ import main as celery_main

    sys.argv = ["celery", *args]
    celery_main()  # exits with celery's status
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
