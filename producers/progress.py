"""A live per-job progress display for terminals; plain change lines when not a terminal."""

from __future__ import annotations

import shutil
import sys
from typing import TextIO

from producers.records import Job

BAR_WIDTH = 24


def human_bytes(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def job_line(job: Job) -> str:
    total = job.size or 0
    sent = min(job.bytes_sent, total) if total else job.bytes_sent
    frac = (sent / total) if total else (1.0 if job.state.value == "done" else 0.0)
    if job.state.value == "done":
        frac = 1.0
    filled = int(frac * BAR_WIDTH)
    bar = "#" * filled + "-" * (BAR_WIDTH - filled)
    extra = ""
    if job.error and job.state.finished:
        err = job.error
        extra = f"  {err.code or ''} {err.description or ''} (status {err.status}, trace {err.trace_id})"
    elif job.wait_reason:
        extra = f"  waiting: {job.wait_reason}"
    elif job.outcome:
        extra = f"  {job.outcome} {job.file_id or ''}".rstrip()
    name = job.file_name if len(job.file_name) <= 28 else job.file_name[:25] + "..."
    return (
        f"{name:<28} [{bar}] {frac * 100:5.1f}% {human_bytes(sent):>10} / {human_bytes(total):<10} "
        f"{job.state.value:<14}{extra}"
    )


class ProgressDisplay:
    """Redraws one line per job in place on a TTY; elsewhere prints a line when a job changes."""

    def __init__(self, out: TextIO = sys.stderr) -> None:
        self.out = out
        self.tty = out.isatty()
        self._drawn = 0
        self._last: dict[str, tuple[str, int]] = {}

    def update(self, jobs: list[Job]) -> None:
        if self.tty:
            width = shutil.get_terminal_size((120, 20)).columns
            lines = [job_line(j)[: width - 1] for j in jobs]
            if self._drawn:
                self.out.write(f"\x1b[{self._drawn}F")
            for line in lines:
                self.out.write("\x1b[2K" + line + "\n")
            self._drawn = len(lines)
            self.out.flush()
            return
        for job in jobs:
            key = (job.state.value, job.bytes_sent)
            if self._last.get(job.id) != key:
                self._last[job.id] = key
                self.out.write(job_line(job) + "\n")
        self.out.flush()
