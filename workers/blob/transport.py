"""PUTs to the upload host, and the one retry loop every request (blob, block, block list) goes through."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import requests

from workers.blob.errors import TRANSIENT_EXC, Aborted, error_from
from workers.blob.sessions import Sessions
from workers.blob.transfer import TransferPolicy
from workers.blob.urls import check_not_expired
from workers.error_text import transport_error
from workers.errors import AworkError, TransientError

log = logging.getLogger(__name__)

_STRIPPED_HEADERS = ("Authorization", "Proxy-Authorization", "Cookie")


def _nothing() -> None:
    return None


@dataclass(frozen=True)
class Put:
    """One request as the retry loop repeats it, with the hooks in which the routes differ."""

    op: str  # "put-blob", "put-block" or "put-block-list": how the host's answers are read
    label: str  # for messages ("put-block <id>")
    url: str  # the upload URL: its expiry is checked before every attempt; never logged
    request_url: str  # what is PUT to (the upload URL, or it with comp=block / comp=blocklist)
    headers: dict[str, str]
    body: Callable[[], Any]  # a fresh body for every attempt
    ok: Collection[int] = (200, 201)
    before: Callable[[], None] = _nothing  # before every attempt: the fence, a progress reset
    # may turn an accepted answer into an error (a server MD5 unlike the streamed one)
    verify: Callable[[requests.Response], AworkError | None] | None = None
    # every failed attempt, with its body: undo its progress, or raise a final error instead
    on_failure: Callable[[AworkError, Any], None] | None = None
    on_retry: Callable[[], None] | None = None  # counts the retries
    abort: threading.Event | None = None  # set when a sibling request failed for good: stop quietly


class Transport:
    """Sessions and retry policy shared by all requests of an uploader."""

    def __init__(self, policy: TransferPolicy, session_factory: Callable[[], requests.Session]) -> None:
        self.policy = policy
        self._sessions = Sessions(session_factory)

    def close(self) -> None:
        self._sessions.close()

    def send(self, url: str, headers: dict[str, str], body: Any) -> requests.Response:
        """PUT without redirects, without any credential header whatever the session carries."""
        with self._sessions.get() as session:
            prepared = session.prepare_request(requests.Request("PUT", url, headers=headers, data=body))
            for name in _STRIPPED_HEADERS:
                prepared.headers.pop(name, None)
            resp = session.send(prepared, timeout=self.policy.timeout, allow_redirects=False)
            resp.close()  # bodies of blob answers are tiny and already read
        return resp

    def put(self, req: Put) -> requests.Response:
        """Send `req` until it is accepted; raise a non-transient error at once, a transient one
        after `block_retries` retries with jittered backoff (the host's Retry-After honoured)."""
        attempt = 0
        while True:
            if req.abort is not None and req.abort.is_set():
                raise Aborted()
            check_not_expired(req.url)
            req.before()
            body = req.body()
            err = self._attempt(req, body)
            if isinstance(err, requests.Response):
                return err
            if req.on_failure is not None:
                req.on_failure(err, body)
            if not isinstance(err, TransientError):
                raise err
            attempt += 1
            if attempt > self.policy.block_retries:
                raise err
            if req.on_retry is not None:
                req.on_retry()
            log.info("%s: %s; retry %d", req.label, err, attempt)
            self._sleep_backoff(attempt, err, req.abort)

    def _attempt(self, req: Put, body: Any) -> requests.Response | AworkError:
        """One attempt: the accepted answer, or the error it amounts to."""
        try:
            resp = self.send(req.request_url, req.headers, body)
        except TRANSIENT_EXC as exc:
            return TransientError(transport_error(req.label, exc, req.url), code="connection")
        if resp.status_code not in req.ok:
            return error_from(resp, req.op)
        problem = req.verify(resp) if req.verify is not None else None
        return resp if problem is None else problem

    def _sleep_backoff(self, attempt: int, err: AworkError, abort: threading.Event | None) -> None:
        p = self.policy
        delay = random.uniform(0, min(p.retry_backoff_max, p.retry_backoff * 2 ** (attempt - 1)))
        if isinstance(err, TransientError) and err.retry_after:
            delay = max(delay, min(err.retry_after, p.retry_backoff_max))
        if abort is not None:
            if abort.wait(delay):
                raise Aborted()
        else:
            time.sleep(delay)
