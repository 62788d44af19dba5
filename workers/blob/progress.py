"""Progress of one transfer, counted from any of its threads and reported at a bounded rate."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

# progress(bytes_sent, total); total is 0 while a URL source's size is unknown
ProgressFn = Callable[[int, int], None]


def _no_fence() -> None:
    return None


class Progress:
    """One upload call's state shared by its threads: counts bytes from any of them, calls the
    callback at most every `interval` seconds, and holds the caller's `fence`."""

    def __init__(
        self, callback: ProgressFn | None, interval: float, fence: Callable[[], None] | None = None
    ) -> None:
        self._cb = callback
        self._interval = interval
        self.fence = fence if fence is not None else _no_fence
        self._lock = threading.Lock()
        self._cb_lock = threading.Lock()
        self.total = 0
        self.done = 0
        self._last = 0.0

    def add(self, n: int) -> None:
        with self._lock:
            self.done += n
            now = time.monotonic()
            due = self._cb is not None and now - self._last >= self._interval
            if due:
                self._last = now
            done, total = self.done, self.total
        if due and self._cb_lock.acquire(blocking=False):
            try:
                assert self._cb is not None
                self._cb(done, total)
            finally:
                self._cb_lock.release()

    def reset(self, total: int) -> None:
        with self._lock:
            self.total = total
            self.done = 0

    def finish(self, size: int | None = None) -> None:
        """The last call: everything is on the server (a URL source's size is known by now)."""
        with self._lock:
            if size is not None:
                self.total = self.done = size
            done, total = self.done, self.total
        if self._cb is not None:
            with self._cb_lock:
                self._cb(done, total)
