"""Test helpers for the blob transfer: Azurite start-or-skip, a recording session, test files."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from ops.azurite import Azurite, AzuriteUnavailable, find_azurite_blob
from workers.blob import plain_session


def start_azurite_or_skip() -> Azurite:
    """A running Azurite; skip with a clear message where node/Azurite is missing, fail under CI."""
    try:
        find_azurite_blob()
    except AzuriteUnavailable as exc:
        if os.environ.get("CI"):
            pytest.fail(f"Azurite is required in CI: {exc}")
        pytest.skip(f"Azurite tests skipped: {exc} (`make test` installs it with npm)")
    return Azurite().start()


def make_file(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


class Recorder:
    """Every prepared request any of its sessions sent (thread-safe), and optional faults."""

    def __init__(self, fault: Callable[[requests.PreparedRequest], None] | None = None) -> None:
        self.lock = threading.Lock()
        self.sent: list[requests.PreparedRequest] = []
        self.fault = fault
        self.hostile = False  # sessions carry an Authorization header and basic auth

    def factory(self) -> requests.Session:
        recorder = self

        class RecordingSession(requests.Session):
            def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
                with recorder.lock:
                    recorder.sent.append(request)
                if recorder.fault is not None:
                    recorder.fault(request)
                return super().send(request, **kwargs)

        base = plain_session()
        session = RecordingSession()
        session.trust_env = False
        for prefix, adapter in base.adapters.items():
            session.mount(prefix, adapter)
        if self.hostile:
            session.headers["Authorization"] = "Bearer awork-api-key-must-never-leave"
            session.auth = ("user", "secret")
        return session

    def blocks(self) -> list[str]:
        """Block ids of every Put Block sent."""
        out = []
        with self.lock:
            for r in self.sent:
                qs = parse_qs(urlsplit(r.url or "").query)
                if qs.get("comp") == ["block"]:
                    out.append(qs["blockid"][0])
        return out

    def comps(self) -> list[str | None]:
        with self.lock:
            out: list[str | None] = []
            for r in self.sent:
                comps = parse_qs(urlsplit(r.url or "").query).get("comp")
                out.append(comps[0] if comps else None)
            return out
