"""A TCP proxy that breaks the network on demand: for the broker-outage tests and runs.

Put it between the workers and Redis (workers get `proxy.url_for(redis_url)`), then:

- `drop()`: close every connection at once, both sides (what a restarted load balancer or a
  NAT table flush does). New connections are accepted as usual.
- `black_hole(seconds)`: keep every connection open but forward no byte in either direction,
  new connections included (they are accepted, then hang), until `heal()` or the time is up.
  Nothing ever fails: only the clients' own timeouts and keepalives can notice, which is what
  makes a partition the nastiest network fault. Bytes sent meanwhile wait in the proxy and
  arrive after the heal, as TCP retransmission would deliver them.

Pure Python (threads), loopback only, no root. Not for production traffic.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
from urllib.parse import urlsplit, urlunsplit

CHUNK = 65536
POLL_SECONDS = 0.1


class TcpProxy:
    def __init__(self, target_host: str, target_port: int, listen_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server((listen_host, 0))
        self.host, self.port = self._listener.getsockname()[:2]
        self._flowing = threading.Event()
        self._flowing.set()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._links: set[_Link] = set()
        self._heal_timer: threading.Timer | None = None
        self.accepted = 0
        self.dropped = 0

    # -- control -------------------------------------------------------------------------------
    def start(self) -> TcpProxy:
        threading.Thread(target=self._accept_loop, name="tcp-proxy-accept", daemon=True).start()
        return self

    def url_for(self, url: str) -> str:
        """`url` (redis://[auth@]host:port/db) with its host and port replaced by the proxy's."""
        parts = urlsplit(url)
        auth = parts.netloc.rpartition("@")[0]
        netloc = f"{auth}@{self.host}:{self.port}" if auth else f"{self.host}:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    def drop(self) -> int:
        """Close every open connection (both sides); returns how many."""
        with self._lock:
            links, self._links = self._links, set()
        for link in links:
            link.close()
        self.dropped += len(links)
        return len(links)

    def black_hole(self, seconds: float | None = None) -> None:
        """Stop forwarding bytes (connections stay open); heal after `seconds` when given."""
        self._flowing.clear()
        if seconds is not None:
            self._heal_timer = threading.Timer(seconds, self.heal)
            self._heal_timer.daemon = True
            self._heal_timer.start()

    def heal(self) -> None:
        if self._heal_timer is not None:
            self._heal_timer.cancel()
            self._heal_timer = None
        self._flowing.set()

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._links)

    def close(self) -> None:
        self._closed.set()
        self.heal()
        _close(self._listener)
        self.drop()

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- forwarding ----------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self.accepted += 1
            link = _Link(client)
            with self._lock:
                self._links.add(link)
            threading.Thread(target=self._serve, args=(link,), name="tcp-proxy-conn", daemon=True).start()

    def _serve(self, link: _Link) -> None:
        # In a black hole a new connection is accepted but gets nowhere until the heal.
        while not self._flowing.wait(POLL_SECONDS):
            if link.closed:
                return
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            self._end(link)
            return
        upstream.settimeout(None)
        link.upstream = upstream
        if link.closed:  # dropped meanwhile
            _close(upstream)
            return
        threading.Thread(target=self._pump, args=(link, upstream, link.client), daemon=True).start()
        self._pump(link, link.client, upstream)

    def _pump(self, link: _Link, src: socket.socket, dst: socket.socket) -> None:
        try:
            while not link.closed:
                if not self._flowing.wait(POLL_SECONDS):
                    continue  # a black hole: read nothing, forward nothing
                ready, _, _ = select.select([src], [], [], POLL_SECONDS)
                if not ready:
                    continue
                data = src.recv(CHUNK)
                if not data:
                    break
                while not self._flowing.wait(POLL_SECONDS):  # a hole opened after the read
                    if link.closed:
                        return
                dst.sendall(data)
        except (OSError, ValueError):  # ValueError: select() on a socket closed by drop()
            pass
        self._end(link)

    def _end(self, link: _Link) -> None:
        with self._lock:
            self._links.discard(link)
        link.close()


class _Link:
    """One client connection and, once the proxy has connected on, its upstream."""

    def __init__(self, client: socket.socket) -> None:
        self.client = client
        self.upstream: socket.socket | None = None
        self.closed = False

    def close(self) -> None:
        self.closed = True
        _close(self.client)
        if self.upstream is not None:
            _close(self.upstream)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
