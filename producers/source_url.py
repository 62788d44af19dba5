"""The one check of an http(s) source URL, shared by producers (at enqueue) and workers (before
every GET, and again for every redirect hop); workers parse upload URLs with it too.

Why two parsers: the standard library's `urlsplit` and urllib3's `parse_url` (what requests
connects with) disagree on odd URLs. `http://evil.test\\@files.example.com/x` is host
`files.example.com` for one and `evil.test` for the other, so a check made with the first parser
would let the second connect elsewhere. Userinfo, backslashes, whitespace and control characters
are refused outright, and both parsers must name the same scheme, host and port.

An allow-list entry is `host`, `host:port`, `[v6]:port` or a URL; without a port it allows the
scheme's default port only (80 for http, 443 for https).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from urllib3.exceptions import LocationParseError
from urllib3.util import parse_url

DEFAULT_PORTS = {"http": 80, "https": 443}
# `\s` matches what str.isspace() calls whitespace (Unicode too); plus C0 controls and DEL.
_SPACE_OR_CONTROL = re.compile(r"[\s\x00-\x1f\x7f]")
# The common case, read without the two parsers: a lowercase scheme, a host name of letters,
# digits, dots and dashes (no userinfo, no IP literal brackets, no percent signs), an optional
# port, and a path / query / fragment of unreserved and sub-delimiter characters without `@`
# or a backslash. Both parsers agree on every such URL; anything else takes the full check.
_PLAIN_URL = re.compile(
    r"(https?)://([a-z0-9](?:[a-z0-9.-]{0,251}[a-z0-9])?)(?::([1-9][0-9]{0,4}))?"
    r"(?:[/?#][A-Za-z0-9._~!$&'()*+,;=:%/?#-]*)?",
    re.ASCII,
)


@dataclass(frozen=True)
class SourceAddress:
    """Where a source URL connects: what both parsers agree on."""

    scheme: str
    host: str
    port: int

    @property
    def hostport(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


class SourceUrlRefused(ValueError):
    """A source URL that must not be fetched; the message says why, without the URL's query."""


def parse_http_url(url: str) -> SourceAddress:
    """The address `url` connects to, or SourceUrlRefused when it is malformed or ambiguous.

    Used for source URLs and for upload URLs alike: whatever the worker connects to is parsed here.
    """
    if not isinstance(url, str) or not url:
        raise SourceUrlRefused("expected an http(s) URL")
    plain = _PLAIN_URL.fullmatch(url)
    if plain and (not plain.group(3) or int(plain.group(3)) <= 65535):
        # nothing in it two parsers could read differently
        scheme, host, port = plain.group(1), plain.group(2), plain.group(3)
        return SourceAddress(scheme, host, int(port) if port else DEFAULT_PORTS[scheme])
    if "\\" in url:
        raise SourceUrlRefused("backslashes are refused in URLs (parsers disagree on them)")
    if _SPACE_OR_CONTROL.search(url):
        raise SourceUrlRefused("whitespace and control characters are refused in URLs")
    try:
        std = urlsplit(url)
        std_port = std.port
        lib = parse_url(url)
    except (ValueError, LocationParseError):
        raise SourceUrlRefused("malformed URL") from None
    scheme = (std.scheme or "").lower()
    if scheme not in DEFAULT_PORTS or not std.hostname:
        raise SourceUrlRefused("only http(s) URLs with a host are accepted")
    if "@" in std.netloc or std.username is not None or lib.auth is not None:
        raise SourceUrlRefused("URLs with credentials are refused (they would travel in messages)")
    host = std.hostname.lower()
    port = std_port if std_port is not None else DEFAULT_PORTS[scheme]
    lib_host = (lib.host or "").lower().strip("[]")
    lib_port = lib.port if lib.port is not None else DEFAULT_PORTS.get((lib.scheme or "").lower())
    if (lib.scheme or "").lower() != scheme or lib_host != host or lib_port != port:
        raise SourceUrlRefused("the URL's host is ambiguous (parsers disagree on it)")
    return SourceAddress(scheme, host, port)


def parse_host_entry(entry: str) -> tuple[str, int | None]:
    """(host, port or None) of one allow-list entry."""
    entry = entry.strip().lower()
    if "://" in entry:
        parts = urlsplit(entry)
        return (parts.hostname or "", parts.port)
    if entry.startswith("["):  # [v6]:port
        host, _, rest = entry[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
    if entry.count(":") == 1:
        host, _, port = entry.partition(":")
        return host, int(port) if port.isdigit() else -1  # -1: a malformed entry matches nothing
    return entry, None


def host_allowed(address: SourceAddress, allowed: Iterable[str]) -> bool:
    """True when an entry names this host with this port, or with no port and the default one."""
    default = DEFAULT_PORTS[address.scheme]
    for entry in allowed:
        host, port = parse_host_entry(entry)
        if host == address.host and (port == address.port or (port is None and address.port == default)):
            return True
    return False


def check_source_url(url: str, allowed: Iterable[str]) -> SourceAddress:
    """The address of an allowed source URL, else SourceUrlRefused (names host:port only)."""
    address = parse_http_url(url)
    if not host_allowed(address, allowed):
        raise SourceUrlRefused(f"host {address.hostport} is not on the allow-list AWORK_SOURCE_URL_HOSTS")
    return address


def source_host_refused(url: str, allowed: Iterable[str]) -> str | None:
    """Why `url` may not be fetched (a message naming at most its host:port), or None."""
    try:
        check_source_url(url, allowed)
    except SourceUrlRefused as exc:
        return str(exc)
    return None


__all__ = [
    "DEFAULT_PORTS",
    "SourceAddress",
    "SourceUrlRefused",
    "check_source_url",
    "host_allowed",
    "parse_host_entry",
    "parse_http_url",
    "source_host_refused",
]
