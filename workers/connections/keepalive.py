"""Keepalive of idle OAuth grants: awork's refresh tokens expire after 30 days unused.

Every worker runs the loop; a Redis lease lets one of them work at a time. Each pass refreshes
(single-flight, like any refresh) the grants not refreshed for AWORK_OAUTH_KEEPALIVE_SECONDS
(7 days by default), at most a batch at a time, so a quiet connection never lapses.
"""

from __future__ import annotations

import logging
import secrets
import threading
from typing import Any

from celery.signals import worker_ready, worker_shutdown

from producers.keys import KEEPALIVE_LEASE_KEY

log = logging.getLogger("awork.connections")

INTERVAL_SECONDS = 60.0


class Keepalive:
    def __init__(self, interval: float = INTERVAL_SECONDS) -> None:
        self.interval = interval
        self.token = secrets.token_hex(8)
        self._stop = threading.Event()

    def run_once(self) -> int:
        from workers.runtime import runtime

        rt = runtime()
        conns = rt.connections
        if conns is None or conns.oauth is None:
            return 0
        ttl = max(2, int(self.interval * 2))
        if not rt.redis.set(KEEPALIVE_LEASE_KEY, self.token, nx=True, ex=ttl):
            if rt.redis.get(KEEPALIVE_LEASE_KEY) != self.token.encode():
                return 0
            rt.redis.expire(KEEPALIVE_LEASE_KEY, ttl)
        done = conns.keepalive(rt.connection_settings.keepalive_seconds)
        if done:
            log.info("keepalive: refreshed %d idle OAuth grant(s)", done)
        return done

    def run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.run_once()
            except Exception:
                log.warning("keepalive pass failed", exc_info=True)

    def start(self) -> None:
        threading.Thread(target=self.run, name="awork-keepalive", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()


_keepalive: Keepalive | None = None


@worker_ready.connect(weak=False, dispatch_uid="awork-oauth-keepalive-start")
def _start(**_: Any) -> None:
    global _keepalive
    _keepalive = Keepalive()
    _keepalive.start()


@worker_shutdown.connect(weak=False, dispatch_uid="awork-oauth-keepalive-stop")
def _stop(**_: Any) -> None:
    if _keepalive is not None:
        _keepalive.stop()
