"""Flower settings (`celery flower --conf=ops/flowerconfig.py`; `ops.flower` passes it).

Flower executes this file: every top-level name is a Flower option. Auth is not set here: it
comes from FLOWER_BASIC_AUTH in the environment, so it is in no file and no command line.
"""

from __future__ import annotations

from typing import Any

# Our task arguments are readable by design (job id, workspace, target, file name): show them.
tasks_columns = "name,uuid,state,args,kwargs,received,started,runtime,worker"
natural_time = False
# Bounded memory: Flower keeps this many tasks.
max_tasks = 50000
# Forget workers that have been offline for an hour (scaled-down replicas).
purge_offline_workers = 3600


def format_task(task: Any) -> Any:
    """Defence in depth for the UI: mask anything credential-shaped in what a task shows.

    (Messages never carry secrets; this only guards against a future mistake.)
    """
    from workers.logging_setup import redact

    for attr in ("args", "kwargs", "result", "exception", "traceback"):
        value = getattr(task, attr, None)
        if isinstance(value, str):
            setattr(task, attr, redact(value))
    return task
