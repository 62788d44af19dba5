"""Graceful shutdown with a bound: SIGTERM lets running steps finish for AWORK_SHUTDOWN_GRACE
seconds (default 60), then hands the rest back to the queue and exits.

What Celery 5.7 does by itself with the threads pool (read in celery/apps/worker.py,
celery/worker/consumer/consumer.py and celery/concurrency/thread.py, and tried):

- SIGTERM (or the first Ctrl-C) is a *warm* shutdown: the worker stops consuming and waits for
  its running tasks, with no limit. Messages it holds for countdowns (ETA) go back to the queue
  when its channel closes (kombu's Redis transport restores unacked messages at shutdown).
- With REMAP_SIGTERM=SIGQUIT, SIGTERM is a *cold* shutdown: the signal handler sleeps
  `worker_soft_shutdown_timeout` seconds (the whole of it, even when the tasks end sooner), then
  cancels the running tasks. A thread cannot be cancelled: the threads pool raises
  NotImplementedError ("does not implement kill_job"), the worker logs an "Unrecoverable error"
  and then waits for the running tasks anyway (ThreadPoolExecutor.shutdown waits), again with no
  limit.

So neither is bounded with threads. This module adds the bound (threads pool only; with
prefork, Celery's cold shutdown can stop a child process): a handler wrapped around
SIGTERM, SIGINT and SIGQUIT (whatever REMAP_SIGTERM says) starts a watchdog thread and then
lets Celery do its own shutdown. If steps are still running when the grace ends, the watchdog
hands them back:

1. it releases this process's step locks and clears the jobs' `running` marks, so the next
   delivery starts at once and does not count a crash against the step (the poison guard is for
   workers that die, not for workers that were asked to stop);
2. it moves every message this worker holds unacknowledged (running steps and countdowns) back
   to its queue with kombu's restore, the same move the visibility timeout would make hours
   later;
3. it exits the process (status 0).

A step cut off this way is safe to run again: a PUT is repeated (the blob is replaced), a link
whose answer never came is reconciled against awork's file list before it is sent again. When
the steps finish within the grace, Celery's own warm shutdown ends the process (the watchdog
only makes sure it does so within a few more seconds).

`worker_soft_shutdown_timeout` is set to the same grace (producers.broker), so a worker started
with REMAP_SIGTERM=SIGQUIT waits as long before the watchdog hands its steps back; plain SIGTERM
is the better choice with the threads pool, as it ends as soon as the running steps are done.
Keep the supervisor's stop timeout (compose `stop_grace_period`, systemd `TimeoutStopSec`) above
the grace plus ~15 s.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from typing import Any

from celery.signals import worker_ready

from producers.broker import shutdown_grace_seconds

log = logging.getLogger("awork.worker")

# After the running steps are done, Celery's own shutdown gets this long before the watchdog ends
# the process itself (a broker that does not answer can wedge a warm shutdown).
TAIL_SECONDS = 10.0
POLL_SECONDS = 0.2

_started = threading.Event()
_consumer: Any = None


@worker_ready.connect
def install(sender: Any = None, **_: Any) -> None:
    """Wrap Celery's shutdown signal handlers (installed by now) so they start the watchdog."""
    global _consumer
    _consumer = sender
    if threading.current_thread() is not threading.main_thread():
        return
    pool = getattr(sender, "pool", None)
    if pool is not None and not type(pool).__module__.endswith(".thread"):
        # prefork and the like: Celery's own cold shutdown can stop a child process
        log.info("shutdown watchdog not installed for the %s pool", type(pool).__module__)
        return
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        previous = signal.getsignal(sig)
        signal.signal(sig, _wrap(previous))


def _wrap(previous: Any) -> Any:
    def handler(signum: int, frame: Any) -> None:
        start_watchdog(signal.Signals(signum).name)
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            raise SystemExit(128 + signum)

    return handler


def start_watchdog(reason: str = "shutdown", grace: float | None = None) -> bool:
    """Start the watchdog once; False when it is already running."""
    if _started.is_set():
        return False
    _started.set()
    grace = shutdown_grace_seconds() if grace is None else grace
    log.warning(
        "%s: shutting down; running steps get %.0f s to finish, then go back to the queue", reason, grace
    )
    threading.Thread(target=_watch, args=(grace,), name="awork-shutdown", daemon=True).start()
    return True


def running_steps() -> int:
    from celery.worker import state

    return len(state.active_requests)


def _watch(grace: float) -> None:
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and running_steps():
        time.sleep(POLL_SECONDS)
    left = running_steps()
    if left:
        log.warning("shutdown grace of %.0f s is over, %d step(s) still running: handing back", grace, left)
    else:
        time.sleep(TAIL_SECONDS)  # normally the process has ended by now
        log.warning("shutdown is taking long after the steps ended: handing back what is left")
    hand_back()
    _exit(0)


def hand_back() -> tuple[int, int]:
    """Release this process's step locks, then restore every message it holds unacknowledged.

    Returns (locks released, messages restored)."""
    from workers.resume import LEDGER

    LEDGER.reconnecting = False  # the process ends: hand back running steps' messages too
    released = 0
    try:
        from workers import runtime as runtime_module

        rt = runtime_module._runtime
        if rt is not None and "locks" in vars(rt):
            for job_id, step, token in rt.locks.held():
                rt.locks.release(job_id, step, token)
                released += 1
    except Exception:
        log.warning("shutdown: could not release step locks (they expire by themselves)", exc_info=True)
    restored = 0
    try:
        restored = _restore_unacked()
    except Exception:
        log.warning("shutdown: could not hand messages back (the sweeper re-drives them)", exc_info=True)
    log.warning("shutdown: released %d step lock(s), handed %d message(s) back", released, restored)
    return released, restored


def _restore_unacked() -> int:
    consumer = _consumer
    task_consumer = getattr(consumer, "task_consumer", None)
    channel = getattr(task_consumer, "channel", None)
    qos = getattr(channel, "qos", None)
    if qos is None:
        return 0
    # (acknowledged tags linger in _delivered until kombu flushes _dirty; only for the count)
    held = set(getattr(qos, "_delivered", {}) or {}) - set(getattr(qos, "_dirty", ()) or ())
    qos.restore_unacked()
    return len(held)


def _exit(code: int) -> None:
    for handler in logging.getLogger().handlers:
        try:
            handler.flush()
        except Exception:  # pragma: no cover - best effort
            pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
