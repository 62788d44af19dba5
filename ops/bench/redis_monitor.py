"""Where a run's Redis commands come from: MONITOR, captured raw and summarised.

`INFO commandstats` counts every command Redis runs, those inside Lua scripts too, but cannot
say which client or script sent them. MONITOR prints each command as it runs, a script's own
commands right after its EVALSHA, marked `[0 lua]`; from that this module tells the commands
clients sent (what the network and the clients pay for) from those scripts ran (Redis CPU only),
and which script ran how many. MONITOR costs Redis CPU of its own: a run under it is for the
counts, not for the CPU figures.
"""

from __future__ import annotations

import hashlib
import re
import socket
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_LINE = re.compile(rb'^\+?[\d.]+ \[\d+ ([^\]]+)\] "([^"]*)"(?: "([^"]*)")?')


def script_names() -> dict[str, str]:
    """sha1 -> file name of the project's Lua scripts (redis-py loads each file's text as is)."""
    names = {}
    for path in [*ROOT.glob("workers/*.lua"), *ROOT.glob("producers/*.lua")]:
        names[hashlib.sha1(path.read_bytes()).hexdigest()] = path.name
    return names


@dataclass
class Tally:
    """Commands seen, by who sent them."""

    sent: Counter[str] = field(default_factory=Counter)  # by clients, by command name
    in_scripts: Counter[str] = field(default_factory=Counter)  # by script name
    script_calls: Counter[str] = field(default_factory=Counter)

    def add_lines(self, lines: list[bytes], names: dict[str, str]) -> None:
        current = "?"
        for line in lines:
            m = _LINE.match(line)
            if m is None:
                continue
            who, command = m.group(1), m.group(2).decode().lower()
            if who == b"lua":
                self.in_scripts[current] += 1
                continue
            if command in ("monitor", "info"):
                continue
            self.sent[command] += 1
            if command in ("evalsha", "eval") and m.group(3) is not None:
                arg = m.group(3).decode()
                current = names.get(arg, "eval" if command == "eval" else arg[:8])
                self.script_calls[current] += 1

    def per_job(self, jobs: int) -> dict[str, object]:
        return {
            "sent_per_job": round(sum(self.sent.values()) / jobs, 1),
            "in_scripts_per_job": round(sum(self.in_scripts.values()) / jobs, 1),
            "sent": {k: round(v / jobs, 2) for k, v in self.sent.most_common(20)},
            "scripts": {
                name: {
                    "calls_per_job": round(self.script_calls[name] / jobs, 2),
                    "commands_inside_per_call": round(n / max(self.script_calls[name], 1), 1),
                }
                for name, n in self.in_scripts.most_common()
            },
        }


class Monitor:
    """A MONITOR connection read in a thread until stop()."""

    def __init__(self, host: str, port: int) -> None:
        self._sock = socket.create_connection((host, port))
        self._sock.sendall(b"MONITOR\r\n")
        self._chunks: list[bytes] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = self._sock.recv(1 << 20)
            except OSError:
                return
            if not chunk:
                return
            self._chunks.append(chunk)

    def stop(self) -> Tally:
        self._sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(5)
        self._sock.close()
        tally = Tally()
        tally.add_lines(b"".join(self._chunks).split(b"\r\n"), script_names())
        return tally
