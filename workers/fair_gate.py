"""Where the steps meet the fair share (workers/fair_share.py): a transfer step takes its slot or
waits in its workspace's list, gives the slot back when it ends, and whoever frees a slot
publishes the jobs dispatched into it. A generate step announces the transfer that follows it.

Fairness never costs a guarantee: when its Redis calls fail for any reason but Redis being
away, a transfer simply starts (first in, first out, as without it); a slot held by a process
that dies lapses with the step's lock.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from typing import Any

import redis
from celery import Celery
from celery.exceptions import Ignore
from celery.signals import worker_init, worker_shutdown
from prometheus_client import Counter

from producers.contract import FINISHED_STATES, QUEUE_TRANSFER, JobState
from producers.priority import record_priority
from producers.records import JobStore
from producers.redrive import canvas_from, resume_step
from workers.fair_share import REGISTER_EVERY_SECONDS, FairShare
from workers.metrics import PREFIX
from workers.step_context import StepContext

log = logging.getLogger("awork.steps")

TRANSFER_STEPS = frozenset({"put", "multipart"})
WAIT_REASON = "fair_share"

FAIR_WAITS = Counter(
    f"{PREFIX}fair_share_waits",
    "Transfers that waited for a slot because their workspace was at its fair share.",
    ["workspace"],
)

_held: dict[str, tuple[str, str]] = {}  # lock token -> (workspace, job id) holding a slot
_held_lock = threading.Lock()


def admit(ctx: StepContext, lock_token: str) -> None:
    """Before a transfer step starts: its slot, or `Ignore` once the job waits in its
    workspace's list (the message is acknowledged; the job is published again when a slot is
    its turn, so the chain's link still runs once)."""
    rt = ctx.rt
    fair = rt.fair
    if not fair.settings.enabled:
        return
    size = ctx.record.get("size")
    try:
        weight = rt.share(ctx.workspace)
        decision = fair.admit(
            ctx.workspace,
            ctx.job_id,
            weight,
            int(size) if size and size.isdigit() else None,
            record_priority(ctx.record),
        )
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
        raise  # run_step hands the message back
    except Exception:
        log.warning("job=%s: fair share unavailable, the transfer starts now", ctx.job_id, exc_info=True)
        return
    publish(ctx.task.app, rt.store, fair, decision.dispatched)
    if decision.granted:
        with _held_lock:
            _held[lock_token] = (ctx.workspace, ctx.job_id)
        return
    ctx.update(wait_reason=WAIT_REASON, wait_until=None)
    FAIR_WAITS.labels(ctx.workspace).inc()
    log.info(
        "step=%s job=%s workspace=%s outcome=waiting_for_slot: the workspace is at its fair share",
        ctx.step,
        ctx.job_id,
        ctx.workspace,
    )
    raise Ignore()


def release(app: Celery, store: JobStore, fair: FairShare, lock_token: str) -> None:
    """A transfer step ended (however): give its slot back and fill the free slots."""
    with _held_lock:
        held = _held.pop(lock_token, None)
    if held is None:
        return
    try:
        publish(app, store, fair, fair.release(*held))
    except Exception:
        log.warning(
            "job=%s: could not give its transfer slot back (it lapses by itself)", held[1], exc_info=True
        )


def expect(ctx: StepContext) -> None:
    """The generate step is done: its job's transfer message is about to be published."""
    fair = ctx.rt.fair
    if not fair.settings.enabled:
        return
    try:
        fair.expect(ctx.workspace, ctx.job_id, ctx.rt.share(ctx.workspace))
    except Exception:
        log.debug("job=%s: could not announce its transfer", ctx.job_id, exc_info=True)


def publish(app: Celery, store: JobStore, fair: FairShare, dispatched: Iterable[tuple[str, str]]) -> int:
    """Publish the step of every job given a slot, from its record (as the sweeper re-drives a
    job). A job that has ended, or whose next step is no transfer, gives its slot back at once.
    Returns how many were published."""
    todo = list(dispatched)
    published = 0
    while todo:
        workspace, job_id = todo.pop(0)
        record = store.get(job_id)
        first = resume_step(record) if record is not None else ""
        if (
            record is None
            or JobState(record.get("state", "queued")) in FINISHED_STATES
            or (first not in TRANSFER_STEPS)
        ):
            todo += fair.release(workspace, job_id)
            continue
        try:
            canvas_from(app, record, first).apply_async()
            published += 1
        except Exception:
            # its reserved slot lapses; the sweeper finds the job without a message and re-drives it
            log.warning("job=%s: could not publish its %s step after a slot came free", job_id, first)
    return published


# -- this worker's slots ---------------------------------------------------------------------------
_stop = threading.Event()
_registration: dict[str, Any] = {}


@worker_init.connect(weak=False, dispatch_uid="awork-fair-share-register")
def _register(sender: Any = None, **_: Any) -> None:
    """Announce this worker's threads as transfer slots, renewed while it runs (a worker that
    does not consume `awork.transfer`, e.g. `--queues awork.api`, has none)."""
    host = getattr(sender, "hostname", None)
    slots = getattr(sender, "concurrency", None)
    if not isinstance(host, str) or not isinstance(slots, int) or slots <= 0:
        return
    try:
        consumed = set(sender.app.amqp.queues.consume_from)
    except Exception:
        consumed = {QUEUE_TRANSFER}
    if QUEUE_TRANSFER not in consumed:
        return
    from workers.runtime import runtime

    fair = runtime().fair
    if not fair.settings.enabled:
        return
    _registration.update(host=host, fair=fair)
    _stop.clear()

    def renew() -> None:
        while True:
            try:
                fair.register(host, slots)
            except Exception:
                log.debug("fair share: could not renew this worker's slots", exc_info=True)
            if _stop.wait(REGISTER_EVERY_SECONDS):
                return

    threading.Thread(target=renew, name="awork-fair-slots", daemon=True).start()


@worker_shutdown.connect(weak=False, dispatch_uid="awork-fair-share-unregister")
def _unregister(**_: Any) -> None:
    _stop.set()
    fair = _registration.get("fair")
    if fair is not None:
        try:
            fair.register(_registration["host"], 0)
        except Exception:
            log.debug("fair share: could not withdraw this worker's slots", exc_info=True)
