"""Worker lifecycle hooks: check the settings, announce the workspaces this worker can serve."""

from __future__ import annotations

import logging
from typing import Any

from celery.signals import worker_init, worker_ready, worker_shutdown

from producers.config import ConfigError
from producers.keys import WORKSPACES_KEY
from workers import event_batching  # noqa: F401  (installs the batched task events)

log = logging.getLogger("awork.worker")


@worker_init.connect
def refuse_bad_settings(**_: Any) -> None:
    """Read the worker's settings once, at start, into the runtime every step of this process
    uses; stop on a configuration error (its message names the variable) instead of consuming
    steps that would all fail. SystemExit passes Celery's signal dispatch."""
    from workers.runtime import runtime

    try:
        runtime()
    except ConfigError as exc:
        log.critical("configuration error, not starting: %s", exc)
        raise SystemExit(2) from None


@worker_init.connect(weak=False, dispatch_uid="awork-worker-events")
def events_flower_needs(sender: Any = None, **_: Any) -> None:
    """No `task-sent` event for what a worker publishes (the next step of a chain, a retry):
    Flower shows that task from its `task-received` on, as it does for the producers' messages
    (producers.messages), and each event is a PUBLISH plus its encoding on the hot path."""
    app = getattr(sender, "app", None)
    if app is not None:
        app.conf.task_send_sent_event = False


@worker_ready.connect
def announce_workspaces(**_: Any) -> None:
    from workers.runtime import runtime

    rt = runtime()
    names = sorted(rt.settings.workspaces)
    if names:
        rt.redis.sadd(WORKSPACES_KEY, *names)
    log.info("worker ready for workspaces: %s", ", ".join(names) or "none (set AWORK_API_KEY)")


_sweeper: Any = None


@worker_ready.connect
def start_sweeper(**_: Any) -> None:
    """Every worker runs the sweeper loop; a Redis lease lets one of them work at a time."""
    global _sweeper
    from workers.runtime import runtime
    from workers.sweeper import Sweeper

    rt = runtime()
    settings = rt.settings
    _sweeper = Sweeper(
        rt.redis, settings.shared.redis_url, settings.shared.staging_dir, settings.sweeper, settings.locks.ttl
    )
    _sweeper.start()


@worker_shutdown.connect
def stop_sweeper(**_: Any) -> None:
    if _sweeper is not None:
        _sweeper.stop()
