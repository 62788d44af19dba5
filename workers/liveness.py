"""The liveness watchdog: a worker whose consumer loop stops turning ends itself, so it is restarted.

A worker that dies is restarted by its supervisor and its messages come back (workers/sweeper.py);
a worker that *hangs* looks alive and holds its messages until a person notices. So:

- a consumer bootstep (`LivenessStep`) puts a repeating timer on Celery's event loop (the hub)
  that records a monotonic timestamp every TICK_SECONDS. The loop is what consumes messages,
  answers pings and acknowledges; when it is stuck (a blocking read on a dead socket, a deadlock),
  the ticks stop;
- a watchdog thread checks the age of the last tick. When it exceeds `AWORK_LIVENESS_SECONDS`
  (default 120; 0 turns the watchdog off), it writes every thread's stack to the log, hands this
  worker's messages back (workers/shutdown.py `hand_back`, bounded to HAND_BACK_SECONDS, as the
  broker may be what it is stuck on) and exits with status EXIT_CODE, so that systemd, compose
  (`restart: unless-stopped`) or Kubernetes starts a fresh process. What it could not hand back,
  the sweeper re-drives as for any dead worker.

While the consumer reconnects to the broker (between the bootstep's stop and its next start) the
loop does not run, by design: the watchdog then waits up to RECONNECT_FACTOR times as long, as
each reconnect attempt is bounded by the broker socket timeouts (producers/broker.py) and Celery
retries them for ever.

`awork_uploads_consumer_loop_tick_age_seconds` (workers/metrics.py) exposes the age, and the
runbook (ops/RUNBOOK.md, "Liveness") shows how to wire a liveness probe to it.

Test-only hook: `AWORK_TEST_BLOCK_LOOP_FILE=<path>`: once that file exists, the next tick blocks
the consumer loop for good (a stand-in for a hang). Never set it in production.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery import bootsteps

from producers.config import env_float

log = logging.getLogger("awork.worker")

LIVENESS_ENV = "AWORK_LIVENESS_SECONDS"
DEFAULT_LIVENESS_SECONDS = 120.0
BLOCK_LOOP_ENV = "AWORK_TEST_BLOCK_LOOP_FILE"
TICK_SECONDS = 1.0
RECONNECT_FACTOR = 3.0
HAND_BACK_SECONDS = 2.0
EXIT_CODE = 70  # EX_SOFTWARE: the process is broken, not asked to stop


@dataclass(frozen=True)
class LivenessSettings:
    seconds: float  # 0: off
    block_file: Path | None  # test hook

    @classmethod
    def from_env(cls) -> LivenessSettings:
        seconds = env_float(LIVENESS_ENV, DEFAULT_LIVENESS_SECONDS)
        if seconds < 0:
            raise ValueError(f"{LIVENESS_ENV}: expected seconds >= 0 (0 = off), got {seconds}")
        raw = os.environ.get(BLOCK_LOOP_ENV, "").strip()
        return cls(seconds, Path(raw) if raw else None)


class Heartbeat:
    """The last tick of the consumer loop, and whether the loop is meant to be running."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.last_tick = time.monotonic()
        self.consuming = False

    def tick(self) -> None:
        with self._lock:
            self.last_tick = time.monotonic()

    def set_consuming(self, consuming: bool) -> None:
        with self._lock:
            self.consuming = consuming
            self.last_tick = time.monotonic()

    def age(self, now: float | None = None) -> float:
        with self._lock:
            return (time.monotonic() if now is None else now) - self.last_tick

    def overdue(self, limit: float, now: float | None = None) -> bool:
        """Is the loop stuck? Reconnecting gets RECONNECT_FACTOR times the limit."""
        with self._lock:
            allowed = limit if self.consuming else limit * RECONNECT_FACTOR
        return self.age(now) > allowed


HEARTBEAT = Heartbeat()


def tick_age() -> float:
    """Seconds since the consumer loop last ticked (for the metric)."""
    return HEARTBEAT.age()


class Watchdog:
    def __init__(self, settings: LivenessSettings, heartbeat: Heartbeat = HEARTBEAT) -> None:
        self.settings = settings
        self.heartbeat = heartbeat
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.settings.seconds <= 0 or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._watch, name="awork-liveness", daemon=True)
        self._thread.start()
        log.info("liveness watchdog on: a consumer loop stuck %.0f s ends this worker", self.settings.seconds)

    def _watch(self) -> None:
        limit = self.settings.seconds
        interval = min(0.5, limit / 4)
        while not self.heartbeat.overdue(limit):
            time.sleep(interval)
        self.fire()

    def fire(self) -> None:
        age = self.heartbeat.age()
        log.critical(
            "liveness: the consumer loop has not ticked for %.0f s (limit %.0f s): writing every "
            "thread's stack, handing messages back and exiting with status %d",
            age,
            self.settings.seconds,
            EXIT_CODE,
        )
        log.critical("liveness: thread stacks\n%s", thread_stacks())
        _bounded(_hand_back, HAND_BACK_SECONDS)
        _exit(EXIT_CODE)


def thread_stacks() -> str:
    """Every thread's stack, named, as text (sys._current_frames)."""
    names = {t.ident: t.name for t in threading.enumerate()}
    out = []
    for ident, frame in sys._current_frames().items():
        out.append(f"--- thread {names.get(ident, '?')} ({ident})\n" + "".join(traceback.format_stack(frame)))
    return "\n".join(out)


def _hand_back() -> None:
    from workers.shutdown import hand_back

    hand_back()


def _bounded(fn: Any, seconds: float) -> None:
    """Run fn in a thread and wait at most `seconds` (it may be stuck on the same broker)."""
    worker = threading.Thread(target=fn, name="awork-liveness-handback", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        log.warning("liveness: handing messages back took over %.0f s; the sweeper re-drives them", seconds)


def _exit(code: int) -> None:
    try:
        for handler in logging.getLogger().handlers:
            handler.flush()
        # the stacks once more, straight to the process' own stderr (Celery wraps sys.stderr in
        # a logger), in case logging is what is stuck
        if sys.__stderr__ is not None:
            faulthandler.dump_traceback(file=sys.__stderr__, all_threads=True)
    except Exception:  # pragma: no cover - best effort, exiting matters more
        pass
    finally:
        os._exit(code)


class LivenessStep(bootsteps.StartStopStep):
    """Consumer bootstep: ticks the heartbeat from the event loop while the consumer runs.

    Started again after every reconnect (Celery cancels a failed connection's timers)."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self.settings = LivenessSettings.from_env()
        self.watchdog = Watchdog(self.settings)
        self.tref: Any = None

    def start(self, c: Any) -> None:
        hub = getattr(c, "hub", None)
        if hub is None:
            log.info("liveness: no event loop (pool without a hub), the watchdog is off")
            return
        HEARTBEAT.set_consuming(True)
        self.tref = hub.call_repeatedly(TICK_SECONDS, self._tick)
        self.watchdog.start()

    def _tick(self) -> None:
        block = self.settings.block_file
        if block is not None and block.exists():
            log.warning("liveness: %s exists: blocking the consumer loop (test hook)", block)
            while True:
                time.sleep(3600)
        HEARTBEAT.tick()

    def stop(self, c: Any) -> None:
        HEARTBEAT.set_consuming(False)
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None

    def shutdown(self, c: Any) -> None:
        self.stop(c)
