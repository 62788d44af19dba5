"""HTTP sessions for the upload host: credential-free, bigger socket writes, one per thread."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import requests
from requests.adapters import HTTPAdapter

from workers.blob.body import SEND_CHUNK

USER_AGENT = "awork-uploads/blob"


class _BlobAdapter(HTTPAdapter):
    """Bigger socket writes than urllib3's 16 KiB default, no hidden urllib3 retries."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("blocksize", SEND_CHUNK)
        super().init_poolmanager(*args, **kwargs)


def plain_session() -> requests.Session:
    """A session for the upload host: no auth, no netrc or proxies from the environment."""
    session = requests.Session()
    session.trust_env = False
    session.auth = None
    adapter = _BlobAdapter(max_retries=0, pool_connections=1, pool_maxsize=4)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers["User-Agent"] = USER_AGENT
    return session


class Sessions:
    """One session per concurrent request (requests.Session is not meant to be shared by threads)."""

    def __init__(self, factory: Callable[[], requests.Session]) -> None:
        self._factory = factory
        self._lock = threading.Lock()
        self._free: list[requests.Session] = []
        self._all: list[requests.Session] = []

    @contextmanager
    def get(self) -> Iterator[requests.Session]:
        with self._lock:
            session = self._free.pop() if self._free else None
        if session is None:
            session = self._factory()
            session.trust_env = False  # whatever the factory did: no netrc/env credentials
            with self._lock:
                self._all.append(session)
        try:
            yield session
        finally:
            with self._lock:
                self._free.append(session)

    def close(self) -> None:
        with self._lock:
            sessions, self._all, self._free = self._all, [], []
        for s in sessions:
            s.close()
