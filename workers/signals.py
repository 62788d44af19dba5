"""Worker lifecycle hooks: announce the workspaces this worker can serve."""

from __future__ import annotations

import logging
from typing import Any

from celery.signals import worker_ready

from producers.client import WORKSPACES_KEY

log = logging.getLogger("awork.worker")


@worker_ready.connect
def announce_workspaces(**_: Any) -> None:
    from workers.runtime import runtime

    rt = runtime()
    names = sorted(rt.settings.workspaces)
    if names:
        rt.redis.sadd(WORKSPACES_KEY, *names)
    log.info("worker ready for workspaces: %s", ", ".join(names) or "none (set AWORK_API_KEY)")
