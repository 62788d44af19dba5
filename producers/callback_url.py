"""The check of a completion callback URL, made by producers at enqueue and by the callback
worker before every POST: the same parser pair and host rule as source URLs
(producers.source_url), against AWORK_CALLBACK_HOSTS.

The allow-list is what keeps callbacks from being aimed at the fleet's own network (Redis, the
metrics ports, a cloud metadata address): an empty list refuses every callback URL. Error texts
name the host and port only, never the path or query (which may carry the receiver's token).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from producers.contract import SpecError
from producers.source_url import SourceUrlRefused, host_allowed, parse_http_url

ENV_NAME = "AWORK_CALLBACK_HOSTS"
MAX_LENGTH = 2048


def callback_hosts_from_env() -> tuple[str, ...]:
    """AWORK_CALLBACK_HOSTS: comma-separated host, host:port or URL entries."""
    raw = os.environ.get(ENV_NAME, "")
    return tuple(h.strip().lower() for h in raw.split(",") if h.strip())


def callback_refused(url: str, allowed: Iterable[str]) -> str | None:
    """Why `url` may not be called back (naming at most its host:port), or None."""
    if not isinstance(url, str) or len(url) > MAX_LENGTH:
        return f"expected an http(s) URL of at most {MAX_LENGTH} characters"
    try:
        address = parse_http_url(url)
    except SourceUrlRefused as exc:
        return str(exc)
    if not host_allowed(address, allowed):
        return f"host {address.hostport} is not on the allow-list {ENV_NAME}"
    return None


def check_callback_url(url: str | None, allowed: Iterable[str], field: str = "callback_url") -> str | None:
    """The URL when it may be called back (None stays None); SpecError naming `field` otherwise."""
    if url is None:
        return None
    refused = callback_refused(url, allowed)
    if refused:
        raise SpecError(field, refused)
    return url
