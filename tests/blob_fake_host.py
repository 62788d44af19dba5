"""A tiny Azure-Blob-like upload host with fault switches, for what Azurite cannot do.

It mimics Put Blob, Put Block and Put Block List closely enough for the transfer engine
(Content-MD5 checked on every request, 403 AuthenticationFailed for an expired or revoked
SAS, XML error bodies with `x-ms-error-code`), and can corrupt a block in flight, answer 503,
refuse block operations, expire a URL after N blocks, lose uncommitted blocks, slow blocks down,
and serve GET sources that break mid-stream (with or without Range support).
"""

from __future__ import annotations

import datetime as dt
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from workers.sources import md5_b64


@dataclass
class Logged:
    method: str
    path: str
    comp: str | None
    block_id: str | None
    status: int
    headers: dict[str, str]
    length: int


@dataclass
class Source:
    data: bytes
    ranges: bool = True
    break_at: int | None = None  # close the connection after this many bytes (once)
    content_length: bool = True
    gets: int = 0


@dataclass
class Switches:
    corrupt_once: set[str] = field(default_factory=set)  # block ids whose first attempt is flipped
    corrupt_put_blob_once: bool = False
    fail_503: int = 0  # the next N block requests answer 503 ServerBusy
    busy_after_blocks: int | None = None  # every block after the first N answers 503
    refuse_blocks: bool = False  # comp=block / blocklist -> 400 UnsupportedQueryParameter
    expire_after_blocks: int | None = None  # the URL's signature dies after N acknowledged blocks
    block_delay: float = 0.0
    echo_md5: bool = True  # Put Blob answers with the Content-MD5 it computed
    echo_wrong_md5: bool = False
    lose_blocks_once: bool = False  # first Put Block List: 400 InvalidBlockList, blocks gone


class FakeBlobHost:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.switches = Switches()
        self.log: list[Logged] = []
        self.blobs: dict[str, tuple[bytes, dict[str, str]]] = {}
        self.uncommitted: dict[str, dict[str, bytes]] = {}
        self.sources: dict[str, Source] = {}
        self.revoked: set[str] = set()
        self._acked_per_sig: dict[str, int] = {}
        self._corrupted: set[str] = set()
        host = self

        class Handler(_Handler):
            fake = host

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> FakeBlobHost:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> FakeBlobHost:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def url(self, name: str, expires_in: float = 3600, container: str = "uploads") -> str:
        se = (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=expires_in)).strftime("%Y-%m-%dT%H:%M:%SZ")
        sig = uuid.uuid4().hex
        return f"http://{self.host}/{container}/{name}?sv=2021-08-06&sr=b&sp=cw&se={se}&sig={sig}"

    def source_url(self, name: str, data: bytes, **opts: Any) -> str:
        self.sources[f"/src/{name}"] = Source(data, **opts)
        return f"http://{self.host}/src/{name}"

    def blob(self, name: str, container: str = "uploads") -> bytes:
        return self.blobs[f"/{container}/{name}"][0]

    def requests_for(self, name: str, comp: str | None = "*", container: str = "uploads") -> list[Logged]:
        path = f"/{container}/{name}"
        with self.lock:
            return [r for r in self.log if r.path == path and (comp == "*" or r.comp == comp)]


class _Handler(BaseHTTPRequestHandler):
    fake: FakeBlobHost
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    # -- helpers

    def _reply(self, status: int, headers: dict[str, str] | None = None, body: bytes = b"") -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("x-ms-request-id", str(uuid.uuid4()))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, code: str) -> None:
        body = (
            f'<?xml version="1.0" encoding="utf-8"?><Error><Code>{code}</Code>'
            f"<Message>{code}</Message></Error>"
        ).encode()
        self._reply(status, {"x-ms-error-code": code, "Content-Type": "application/xml"}, body)

    # -- GET sources

    def do_GET(self) -> None:
        src = self.fake.sources.get(urlsplit(self.path).path)
        if src is None:
            self._reply(404)
            return
        src.gets += 1
        data = src.data
        etag = f'"{md5_b64(data)}"'
        start = 0
        status = 200
        rng = self.headers.get("Range")
        if rng and src.ranges:
            if_range = self.headers.get("If-Range")
            if if_range is None or if_range == etag:
                start = int(re.match(r"bytes=(\d+)-", rng).group(1))  # type: ignore[union-attr]
                status = 206
        self.send_response(status)
        if src.ranges:
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", etag)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        if src.content_length:
            self.send_header("Content-Length", str(len(data) - start))
        else:
            self.send_header("Connection", "close")
        self.end_headers()
        body = data[start:]
        if src.break_at is not None and start < src.break_at:
            self.wfile.write(body[: src.break_at - start])
            self.wfile.flush()
            src.break_at = None
            self.close_connection = True
            return
        self.wfile.write(body)
        if not src.content_length:
            self.close_connection = True

    # -- PUT: Put Blob / Put Block / Put Block List

    def do_PUT(self) -> None:
        fake = self.fake
        sw = fake.switches
        parts = urlsplit(self.path)
        qs = {k: v[0] for k, v in parse_qs(parts.query).items()}
        comp = qs.get("comp")
        bid = qs.get("blockid")
        headers = {k.lower(): v for k, v in self.headers.items()}
        length = int(headers.get("content-length", "-1"))
        status_holder = [0]

        def log(status: int) -> None:
            status_holder[0] = status
            with fake.lock:
                fake.log.append(Logged("PUT", parts.path, comp, bid, status, headers, max(length, 0)))

        if length < 0:
            log(411)
            self.close_connection = True
            self._error(411, "MissingContentLengthHeader")
            return
        data = self.rfile.read(length)
        sig = qs.get("sig", "")
        se = qs.get("se", "")
        expired = not sig or sig in fake.revoked
        try:
            if dt.datetime.fromisoformat(se.replace("Z", "+00:00")) <= dt.datetime.now(dt.UTC):
                expired = True
        except ValueError:
            expired = True
        if expired:
            log(403)
            self._error(403, "AuthenticationFailed")
            return

        if comp in ("block", "blocklist") and sw.refuse_blocks:
            log(400)
            self._error(400, "UnsupportedQueryParameter")
            return

        if comp == "block":
            assert bid is not None
            if sw.block_delay:
                time.sleep(sw.block_delay)
            with fake.lock:
                busy = sw.fail_503 > 0
                if busy:
                    sw.fail_503 -= 1
                if sw.busy_after_blocks is not None:
                    busy = busy or sum(fake._acked_per_sig.values()) >= sw.busy_after_blocks
                corrupt = bid in sw.corrupt_once and bid not in fake._corrupted
                if corrupt:
                    fake._corrupted.add(bid)
            if busy:
                log(503)
                self._error(503, "ServerBusy")
                return
            if corrupt:
                data = bytes([data[0] ^ 0xFF]) + data[1:]
            if "content-md5" in headers and headers["content-md5"] != md5_b64(data):
                log(400)
                self._error(400, "Md5Mismatch")
                return
            with fake.lock:
                fake.uncommitted.setdefault(parts.path, {})[bid] = data
                n = fake._acked_per_sig[sig] = fake._acked_per_sig.get(sig, 0) + 1
                if sw.expire_after_blocks is not None and n >= sw.expire_after_blocks:
                    fake.revoked.add(sig)
            log(201)
            self._reply(201, {"Content-MD5": md5_b64(data)})
            return

        if comp == "blocklist":
            if "content-md5" in headers and headers["content-md5"] != md5_b64(data):
                log(400)
                self._error(400, "Md5Mismatch")
                return
            ids = re.findall(r"<Latest>([^<]+)</Latest>", data.decode())
            with fake.lock:
                if sw.lose_blocks_once:
                    sw.lose_blocks_once = False
                    fake.uncommitted.pop(parts.path, None)
                stored = fake.uncommitted.get(parts.path, {})
                missing = [i for i in ids if i not in stored]
                if not missing:
                    blob = b"".join(stored[i] for i in ids)
                    fake.blobs[parts.path] = (
                        blob,
                        {
                            "content-type": headers.get("x-ms-blob-content-type", ""),
                            "content-md5": headers.get("x-ms-blob-content-md5", ""),
                        },
                    )
                    fake.uncommitted.pop(parts.path, None)
            if missing:
                log(400)
                self._error(400, "InvalidBlockList")
                return
            log(201)
            self._reply(201)
            return

        if comp is not None:
            log(400)
            self._error(400, "InvalidQueryParameterValue")
            return
        if headers.get("x-ms-blob-type") != "BlockBlob":
            log(400)
            self._error(400, "MissingRequiredHeader")
            return
        with fake.lock:
            corrupt = sw.corrupt_put_blob_once
            sw.corrupt_put_blob_once = False
        if corrupt and data:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        if "content-md5" in headers and headers["content-md5"] != md5_b64(data):
            log(400)
            self._error(400, "Md5Mismatch")
            return
        with fake.lock:
            fake.blobs[parts.path] = (
                data,
                {"content-type": headers.get("content-type", ""), "content-md5": md5_b64(data)},
            )
            fake.uncommitted.pop(parts.path, None)
        log(201)
        reply: dict[str, str] = {}
        if sw.echo_md5:
            reply["Content-MD5"] = md5_b64(b"x" + data) if sw.echo_wrong_md5 else md5_b64(data)
        self._reply(201, reply)
