"""`via awork`: may awork fetch this URL itself? Public, and at most 100 MB.

awork's byurl route fetches "a public available url" of at most 100 MB. We check both before
asking it, at enqueue and again in the worker, so a job fails here with a clear error rather
than at awork with a vague one, and so no one can make awork's fetch (or our HEAD) reach into a
private network through us.

"Public" means: an http(s) URL without credentials (parsed as `producers.source_url` does)
whose host resolves only to global addresses (`ipaddress.is_global`: not loopback, RFC 1918,
carrier-grade NAT, link-local, unique-local, multicast, reserved or unspecified). With the
sandbox test mode on (AWORK_SANDBOX_TEST_MODE) loopback addresses count as public too, because
the sandbox fetches from loopback test servers only. The size is the HEAD answer's
Content-Length; a source that does not announce one is refused, since its size cannot be known
before awork fetches it. Redirects are followed by hand (at most MAX_REDIRECTS), each hop
checked like the first. The check runs before each connection, so a host that resolves
differently a moment later (DNS rebinding) is out of our hands: awork makes its own fetch.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING
from urllib.parse import urljoin

import requests

from producers.contract import SpecError
from producers.source_url import SourceUrlRefused, parse_http_url

if TYPE_CHECKING:
    from producers.spec import ValidSpec

BYURL_MAX_BYTES = 100_000_000  # awork's documented cap for POST .../files/byurl
MAX_REDIRECTS = 5
HEAD_TIMEOUT = (5.0, 15.0)
Resolver = Callable[[str, int], list[str]]


class SourceNotPublic(ValueError):
    """The source cannot go `via awork`; the message names the host, never the path or query."""


class SourceUnreachable(SourceNotPublic):
    """The HEAD request failed (network) or the host did not resolve: may pass later."""


def resolve(host: str, port: int) -> list[str]:
    """Every address `host` resolves to."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise SourceUnreachable(f"host {host} does not resolve ({exc.strerror})") from None
    return sorted({str(info[4][0]) for info in infos})


def address_public(text: str, allow_loopback: bool) -> bool:
    addr = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if allow_loopback and addr.is_loopback:
        return True
    return addr.is_global


def check_public_url(url: str, allow_loopback: bool, resolver: Resolver = resolve) -> None:
    """SourceNotPublic unless every address of the URL's host is public."""
    try:
        address = parse_http_url(url)
    except SourceUrlRefused as exc:
        raise SourceNotPublic(str(exc)) from None
    addresses = resolver(address.host, address.port)
    private = [a for a in addresses if not address_public(a, allow_loopback)]
    if not addresses or private:
        raise SourceNotPublic(
            f"host {address.hostport} is not public (resolves to {', '.join(private or addresses)}); "
            "awork can fetch only public URLs"
        )


def public_source_size(
    url: str,
    allow_loopback: bool,
    session: requests.Session | None = None,
    resolver: Resolver = resolve,
) -> int:
    """The size a public source announces (HEAD, redirects checked hop by hop), or
    SourceNotPublic: not public, no Content-Length, over BYURL_MAX_BYTES, or an error answer."""
    http = session or requests.Session()
    http.trust_env = False
    current = url
    try:
        for _ in range(MAX_REDIRECTS + 1):
            check_public_url(current, allow_loopback, resolver)
            host = parse_http_url(current).hostport
            try:
                resp = http.head(current, allow_redirects=False, timeout=HEAD_TIMEOUT)
            except requests.RequestException as exc:
                raise SourceUnreachable(f"host {host}: HEAD failed ({type(exc).__name__})") from None
            if resp.is_redirect and resp.headers.get("Location"):
                current = urljoin(current, resp.headers["Location"])
                continue
            if resp.status_code >= 500 or resp.status_code in (408, 429):
                raise SourceUnreachable(f"host {host}: HEAD answered {resp.status_code}")
            if resp.status_code != 200:
                raise SourceNotPublic(f"host {host}: HEAD answered {resp.status_code}")
            raw = resp.headers.get("Content-Length", "")
            if not raw.isdigit():
                raise SourceNotPublic(
                    f"host {host}: HEAD announced no Content-Length, so the size (awork fetches at most "
                    f"{BYURL_MAX_BYTES} bytes) cannot be known"
                )
            size = int(raw)
            if size > BYURL_MAX_BYTES:
                raise SourceNotPublic(
                    f"{size} bytes at host {host} is over awork's {BYURL_MAX_BYTES}-byte cap for fetching "
                    "by URL; send it through the workers instead (leave via unset)"
                )
            if size == 0:
                raise SourceNotPublic(f"host {host}: the source is empty (awork does not take empty files)")
            return size
        raise SourceNotPublic(f"more than {MAX_REDIRECTS} redirects")
    finally:
        if session is None:
            http.close()


def by_url_checked(spec: ValidSpec, allow_loopback: bool) -> ValidSpec:
    """At enqueue: a `via awork` spec with its source's size, or SpecError naming `source`."""
    if spec.placement.via != "awork" or spec.url is None:
        return spec
    try:
        size = public_source_size(spec.url, allow_loopback)
    except SourceNotPublic as exc:
        raise SpecError("source", f"via awork: {exc}") from None
    return replace(spec, size=size)
