"""Upload URLs: the allow-list check, the SAS expiry, the blob's identity, request variants."""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Collection
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

from producers.source_url import SourceAddress, SourceUrlRefused, host_allowed, parse_http_url
from workers.errors import PermanentError, UploadUrlExpired


def check_upload_url(url: str, allowed_hosts: Collection[str]) -> SourceAddress:
    """PermanentError unless `url` is http(s), unambiguous, has no userinfo and its host:port is
    allowed. The same parse and allow-list rule as source URLs (producers.source_url): an entry
    without a port allows the scheme's default port (80/443) only.
    """
    try:
        address = parse_http_url(url)
    except SourceUrlRefused as exc:
        raise PermanentError(f"upload URL refused: {exc}", code="upload-url-invalid") from None
    if not host_allowed(address, allowed_hosts):
        raise PermanentError(
            f"upload host {address.hostport} is not in AWORK_UPLOAD_HOSTS", code="upload-host-refused"
        )
    return address


def url_expiry(url: str) -> dt.datetime | None:
    """The SAS `se=` expiry of an upload URL (UTC), or None when absent or unreadable."""
    values = parse_qs(urlsplit(url).query).get("se")
    if not values:
        return None
    text = values[0].strip()
    try:
        if len(text) == 10:  # a date alone: valid until that day starts (Azure's reading)
            return dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC)
        parsed = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def check_not_expired(url: str) -> None:
    """UploadUrlExpired once our clock is past the URL's `se=`: no request that must fail."""
    expiry = url_expiry(url)
    if expiry is not None and expiry <= dt.datetime.now(dt.UTC):
        raise UploadUrlExpired(f"upload URL expired at {expiry.isoformat()}", code="upload-url-expired")


def upload_identity(url: str) -> str:
    """A hash of the blob's address (host and path): the same blob whatever the signature."""
    parts = urlsplit(url)
    address = f"{(parts.hostname or '').lower()}:{parts.port or ''}{parts.path}"
    return hashlib.sha256(address.encode()).hexdigest()[:32]


def with_query(url: str, **params: str) -> str:
    """`url` with `params` added to its query (comp=block, blockid=...), its signature kept."""
    parts = urlsplit(url)
    extra = urlencode(params)
    query = f"{parts.query}&{extra}" if parts.query else extra
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))
