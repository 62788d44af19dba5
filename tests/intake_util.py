"""The HTTP intake on a free loopback port (uvicorn in a thread), tokens, and a callback receiver."""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.server
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import redis
import uvicorn
from cryptography.fernet import Fernet

from ops.redis_server import free_port
from producers.api_tokens import ApiTokens, NewToken
from producers.client import Uploads
from producers.config import SharedSettings
from producers.intake.app import create_app
from producers.intake.settings import IntakeSettings

SECRETS_KEY = Fernet.generate_key().decode()


@dataclass
class Intake:
    url: str
    uploads: Uploads
    server: uvicorn.Server
    thread: threading.Thread


@contextmanager
def running_intake(shared: SharedSettings, max_body_bytes: int = 50 * 1024 * 1024) -> Iterator[Intake]:
    settings = IntakeSettings(shared=shared, max_body_bytes=max_body_bytes)
    uploads = Uploads(shared, redis_retry_seconds=1.0)
    app = create_app(settings, uploads)
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if time.monotonic() > deadline:
            raise TimeoutError("the intake did not start")
        time.sleep(0.05)
    try:
        yield Intake(f"http://127.0.0.1:{port}", uploads, server, thread)
    finally:
        server.should_exit = True
        thread.join(10)
        uploads.close()


def make_token(redis_url: str, workspaces: list[str], rate: int = 1000, name: str = "app") -> NewToken:
    """A token as `api-tokens create` makes it (the callback secret sealed under SECRETS_KEY)."""
    box = Fernet(SECRETS_KEY.encode())
    client = redis.Redis.from_url(redis_url)
    try:
        return ApiTokens(client).create(
            name,
            workspaces,
            lambda s: box.encrypt(json.dumps({"callback_secret": s}).encode()).decode(),
            rate,
        )
    finally:
        client.close()


def verify_signature(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """What a receiver does (Standard Webhooks): HMAC-SHA256 over `<id>.<timestamp>.<body>`."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    given = [s.split(",", 1)[1] for s in headers["webhook-signature"].split() if s.startswith("v1,")]
    return any(hmac.compare_digest(expected, g) for g in given)


@dataclass
class Receiver:
    """A callback receiver on loopback that answers 500 to its first `fail_first` requests."""

    port: int
    fail_first: int = 0
    received: list[tuple[dict[str, str], bytes, int]] = field(default_factory=list)
    _server: http.server.ThreadingHTTPServer | None = None

    def __post_init__(self) -> None:
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status = 500 if len(receiver.received) < receiver.fail_first else 204
                headers = {k.lower(): v for k, v in self.headers.items()}
                receiver.received.append((headers, body, status))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return None

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def delivered(self) -> list[tuple[dict[str, str], dict[str, Any]]]:
        return [(h, json.loads(b)) for h, b, s in self.received if s < 300]

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
