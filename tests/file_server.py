"""A loopback HTTP server for URL sources: GET and HEAD of registered bytes, or a fake size."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Files:
    base: str
    bodies: dict[str, bytes] = field(default_factory=dict)
    # name -> Content-Length a HEAD announces without a body behind it (a "huge" source)
    head_sizes: dict[str, int] = field(default_factory=dict)
    gets: list[str] = field(default_factory=list)

    def url(self, name: str) -> str:
        return f"{self.base}/{name}"


@contextmanager
def file_server() -> Iterator[Files]:
    files = Files("")

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, with_body: bool) -> None:
            name = self.path.lstrip("/")
            if name in files.head_sizes and not with_body:
                self.send_response(200)
                self.send_header("Content-Length", str(files.head_sizes[name]))
                self.end_headers()
                return
            body = files.bodies.get(name)
            if body is None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if with_body:
                files.gets.append(name)
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if with_body:
                self.wfile.write(body)

        def do_GET(self) -> None:
            self._answer(True)

        def do_HEAD(self) -> None:
            self._answer(False)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    files.base = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield files
    finally:
        server.shutdown()
        server.server_close()
