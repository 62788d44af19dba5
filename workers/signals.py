"""Worker lifecycle hooks: check the settings, announce the workspaces this worker can serve."""

from __future__ import annotations

import logging
from typing import Any

from celery.signals import worker_init, worker_ready, worker_shutdown

from producers.config import ConfigError
from producers.keys import WORKSPACES_KEY

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
    _sweeper = Sweeper(rt.redis, rt.settings.shared.redis_url, rt.settings.shared.staging_dir)
    _sweeper.start()


@worker_shutdown.connect
def stop_sweeper(**_: Any) -> None:
    if _sweeper is not None:
        _sweeper.stop()
