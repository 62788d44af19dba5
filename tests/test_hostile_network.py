"""Hostile source hosts and network faults (issue #11): redirects, parser confusion, size caps,
URLs leaking through error texts. Real HTTP on loopback; no mocks of requests or urllib3."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from ops.redis_server import free_port
from producers.contract import SpecError
from producers.spec import JobSpec, source_host_refused, validate
from workers.blob import BlobUploader, MemoryFallbackStore, TransferPolicy
from workers.errors import AworkError, PermanentError, TransientError
from workers.sources import FileSource, SourceInterrupted
from workers.url_source import UrlSource

KiB = 1024
MiB = 1024 * KiB
ID = "7d1c2b44-2f4e-4a53-9f0f-2f1a6f6a3c11"
SECRET_SIG = "sig=TOPSECRETsignature0123"

Route = Callable[[BaseHTTPRequestHandler], None]


class Host:
    """A loopback HTTP server whose answers are plain functions; counts the bytes it sent."""

    def __init__(self, routes: dict[str, Route], http10: bool = False) -> None:
        self.routes = routes
        self.sent = 0
        self.hits: list[str] = []
        host = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0" if http10 else "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                host.hits.append(path)
                route = host.routes.get(path)
                if route is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                route(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05})
        self.thread.daemon = True

    @property
    def hostport(self) -> str:
        return f"127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return f"http://{self.hostport}{path}"

    def start(self) -> Host:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def body(data: bytes, length: bool = True) -> Route:
    def route(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        if length:
            h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    return route


def redirect(location: str, status: int = 302) -> Route:
    def route(h: BaseHTTPRequestHandler) -> None:
        h.send_response(status)
        h.send_header("Location", location)
        h.send_header("Content-Length", "0")
        h.end_headers()

    return route


def endless(host_ref: list[Host], announce: int | None = None) -> Route:
    """Sends zeros until the client hangs up; counts what went out."""

    def route(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        if announce is not None:
            h.send_header("Content-Length", str(announce))
        h.end_headers()
        chunk = b"\0" * (64 * KiB)
        try:
            for _ in range(100_000):
                h.wfile.write(chunk)
                host_ref[0].sent += len(chunk)
        except OSError:
            pass

    return route


@pytest.fixture
def hosts() -> Iterator[Callable[..., Host]]:
    started: list[Host] = []

    def make(routes: dict[str, Route], http10: bool = False) -> Host:
        h = Host(routes, http10).start()
        started.append(h)
        return h

    yield make
    for h in started:
        h.stop()


def open_source(record: dict[str, str], hosts: tuple[str, ...], staging: Path, **kw: Any) -> Any:
    """The worker's own `open_source` (what the put and multipart steps call)."""
    from workers.steps import open_source as worker_open_source

    return worker_open_source(record, hosts, staging, **kw)


def _url_record(url: str) -> dict[str, str]:
    return {"id": "j1", "source_kind": "url", "source": url}


def _read_all(source: Any) -> bytes:
    reader = source.open()
    try:
        out = b""
        while chunk := reader.read(MiB):
            out += chunk
        return out
    finally:
        reader.close()


# -- #11.1 redirects ----------------------------------------------------------------------------


def test_redirect_off_the_allow_list_is_refused(hosts: Callable[..., Host], tmp_path: Path) -> None:
    """#11.1: an allowed host that redirects to an internal one is not followed (SSRF)."""
    internal = hosts({"/secret": body(b"internal admin page")})
    public = hosts({"/file": redirect(internal.url("/secret"))})
    source = open_source(_url_record(public.url("/file")), (public.hostport,), tmp_path)
    with pytest.raises(PermanentError) as info:
        _read_all(source)
    assert info.value.code == "source-redirect-refused"
    assert internal.hits == []
    assert f"host {internal.hostport} is not on the allow-list" in str(info.value)


def test_redirect_on_the_allow_list_is_followed_and_rechecked(
    hosts: Callable[..., Host], tmp_path: Path
) -> None:
    """#11.1: every hop is checked with the same parser; hops within the list are followed."""
    data = os.urandom(3000)
    other = hosts({"/real": body(data)})
    first = hosts({"/a": redirect("/b", 301), "/b": redirect(other.url("/real"), 307)})
    allowed = (first.hostport, other.hostport)
    assert _read_all(open_source(_url_record(first.url("/a")), allowed, tmp_path)) == data
    # a hop to a URL the host parsers disagree on is refused as well
    tricky = hosts({"/t": redirect(f"http://127.0.0.1:{other.port}\\@{first.hostport}/real")})
    with pytest.raises(PermanentError) as info:
        _read_all(open_source(_url_record(tricky.url("/t")), (tricky.hostport, first.hostport), tmp_path))
    assert info.value.code == "source-redirect-refused"
    # a bare UrlSource (no allow-list given) follows none
    with pytest.raises(PermanentError, match="redirects are not followed"):
        _read_all(UrlSource(first.url("/a"), requests.Session()))


def test_endless_redirects_stop(hosts: Callable[..., Host], tmp_path: Path) -> None:
    """#11.1: a redirect loop ends with a clear error, not a hang."""
    loop = hosts({"/x": redirect("/y"), "/y": redirect("/x")})
    with pytest.raises(PermanentError, match="more than 5 redirects") as info:
        _read_all(open_source(_url_record(loop.url("/x")), (loop.hostport,), tmp_path))
    assert info.value.code == "source-redirect-refused"


# -- #11.4 one parser for the check and the connection ------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://evil.test\\@files.example.com/x",
        "http://evil.test%5C@files.example.com/x",
        "http://files.example.com\\x",
        "http://u@files.example.com/x",
        "http://files.example.com:8080/x",  # an entry without a port: the default port only
        "https://files.example.com:80/x",
        "http://files.example.com /x",
        "http://files.example.com/x\n",
    ],
)
def test_source_url_check_refuses_what_parsers_read_differently(url: str) -> None:
    """#11.4: userinfo, backslashes and other ports are refused by producer and worker alike."""
    allowed = ("files.example.com",)
    assert source_host_refused(url, allowed) is not None
    with pytest.raises(SpecError, match=r"^source: "):
        validate(JobSpec(url, f"task:{ID}"), None, allowed)
    with pytest.raises(PermanentError) as info:
        open_source(_url_record(url), allowed, Path("/nonexistent"))
    assert info.value.code == "source-refused"


def test_source_url_check_accepts_plain_urls() -> None:
    """#11.4: the usual forms stay accepted; an explicit port entry allows that port."""
    allowed = ("files.example.com", "cdn.example.com:8443", "[::1]:9000")
    for url in (
        "https://files.example.com/a%20b.pdf?sig=x",
        "http://FILES.example.com:80/x",
        "https://cdn.example.com:8443/x",
        "http://[::1]:9000/x",
    ):
        assert source_host_refused(url, allowed) is None, url
    assert source_host_refused("https://cdn.example.com/x", allowed) is not None


def test_backslash_url_never_connects_to_the_other_host(hosts: Callable[..., Host], tmp_path: Path) -> None:
    """#11.4: `http://A\\@B/` passes a urlsplit check for B but requests would connect to A."""
    attacker = hosts({"/": body(b"from the other host")})
    allowed_host = hosts({"/x": body(b"fine")})
    url = f"http://127.0.0.1:{attacker.port}\\@{allowed_host.hostport}/x"
    with pytest.raises(PermanentError) as info:
        _read_all(open_source(_url_record(url), (allowed_host.hostport,), tmp_path))
    assert info.value.code == "source-refused"
    assert attacker.hits == [] and allowed_host.hits == []


# -- #11.11 size cap --------------------------------------------------------------------------


def test_content_length_above_the_cap_is_refused_before_reading(
    hosts: Callable[..., Host], tmp_path: Path
) -> None:
    """#11.11: an announced size above AWORK_MAX_SOURCE_BYTES fails at once."""
    ref: list[Host] = []
    big = hosts({"/big": endless(ref, announce=50 * MiB)})
    ref.append(big)
    source = open_source(_url_record(big.url("/big")), (big.hostport,), tmp_path, max_source_bytes=1 * MiB)
    with pytest.raises(PermanentError) as info:
        source.open()
    assert info.value.code == "source-too-large"
    assert "AWORK_MAX_SOURCE_BYTES" in str(info.value)


def test_unknown_length_stops_at_the_cap(hosts: Callable[..., Host], tmp_path: Path) -> None:
    """#11.11: a body without Content-Length is counted and cut at the cap."""
    ref: list[Host] = []
    host = hosts({"/s": endless(ref)}, http10=True)
    ref.append(host)
    cap = 2 * MiB
    source = open_source(_url_record(host.url("/s")), (host.hostport,), tmp_path, max_source_bytes=cap)
    reader = source.open()
    got = 0
    with pytest.raises(PermanentError) as info:
        while chunk := reader.read(256 * KiB):
            got += len(chunk)
    reader.close()
    assert info.value.code == "source-too-large"
    assert got <= cap


def test_spool_for_a_host_without_blocks_stops_at_the_cap(hosts: Callable[..., Host], tmp_path: Path) -> None:
    """#11.11: unknown size + an upload host that refuses blocks spools to disk: at most the cap."""
    from tests.blob_fake_host import FakeBlobHost

    ref: list[Host] = []
    src = hosts({"/s": endless(ref)}, http10=True)
    ref.append(src)
    spool = tmp_path / "spool"
    spool.mkdir()
    cap = 3 * MiB
    with FakeBlobHost() as fake:
        store = MemoryFallbackStore()
        store.remember_refusal(fake.host, "test")
        policy = TransferPolicy(single_put_threshold=MiB, block_size=256 * KiB, retry_backoff=0.01)
        up = BlobUploader([fake.host], policy, fallback_store=store, spool_dir=str(spool))
        source = open_source(_url_record(src.url("/s")), (src.hostport,), tmp_path, max_source_bytes=cap)
        with up, pytest.raises(PermanentError) as info:
            up.upload(fake.url("n.bin"), source, content_type="x/y")
        assert info.value.code == "source-too-large"
        assert list(spool.iterdir()) == []  # the spool file is gone
        assert fake.log == []  # nothing was PUT
    assert src.sent < 64 * MiB  # the GET was cut off (the sender saw a hang-up), not read to its end


# -- #11.2 no URL in error texts ----------------------------------------------------------------


def _closed_port() -> int:
    port = free_port()
    with socket.socket() as s:  # nothing listens there: connections are refused
        assert s.connect_ex(("127.0.0.1", port)) != 0
    return port


def _assert_clean(err: AworkError, host: str) -> None:
    text = f"{err} {err.message} {err!r}"
    assert "sig=" not in text and "TOPSECRET" not in text, text
    assert "/uploads/" not in text and "/private/" not in text, text
    assert host in text, text
    # nothing chained that would carry the library's text along
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)


def test_upload_host_refusing_connections_leaks_no_url(tmp_path: Path) -> None:
    """#11.2: requests' text (path and SAS query) stays out of the error; host and class are in."""
    port = _closed_port()
    host = f"127.0.0.1:{port}"
    url = f"http://{host}/uploads/blob.bin?sv=2021&se=2099-01-01T00:00:00Z&{SECRET_SIG}"
    policy = TransferPolicy(block_retries=1, retry_backoff=0.01, retry_backoff_max=0.01)
    with BlobUploader([host], policy) as up, pytest.raises(TransientError) as info:
        f = tmp_path / "f.bin"
        f.write_bytes(b"x" * 100)
        up.upload(url, FileSource(f), content_type="x/y")
    assert info.value.code == "connection"
    assert "ConnectionError" in info.value.message
    _assert_clean(info.value, host)


def test_signed_source_url_refusing_connections_leaks_no_url(tmp_path: Path) -> None:
    """#11.2: the same for a signed source URL."""
    port = _closed_port()
    host = f"127.0.0.1:{port}"
    url = f"http://{host}/private/file.pdf?{SECRET_SIG}"
    source = open_source(_url_record(url), (host,), tmp_path)
    with pytest.raises(SourceInterrupted) as info:
        source.open()
    assert info.value.code == "source-unreachable"
    _assert_clean(info.value, host)


def test_error_text_scrub() -> None:
    """#11.2: the one redaction applied to every error text a record gets."""
    from workers.error_text import scrub

    raw = (
        "HTTPConnectionPool(host='blob.example', port=443): Max retries exceeded with url: "
        f"/c/b.bin?sv=1&{SECRET_SIG} (Caused by NewConnectionError('refused')) "
        f"see https://user:pw@blob.example:8443/c/b.bin?{SECRET_SIG}&X-Amz-Signature=abc"
    )
    out = scrub(raw)
    assert "TOPSECRET" not in out and "sig=" not in out and "X-Amz" not in out and "pw" not in out
    assert "/c/b.bin" not in out
    assert "https://blob.example:8443" in out and "NewConnectionError" in out
    assert len(scrub("x" * 10_000)) <= 2000


# -- #11.9 log redaction ---------------------------------------------------------------------

_LEAKY_LINES = [
    ("url-encoded sig", "next=https%3A%2F%2Fb.ex%2Fc%3Fsv%3D1%26sig%3DSECRETabc%252Fd%26se%3D2", "SECRETabc"),
    ("X-Amz-Signature", "GET https://s3.ex/b/k?X-Amz-Algorithm=A&X-Amz-Signature=SECRETabc&x=1", "SECRETabc"),
    ("X-Goog-Signature", "https://storage.example/o?X-Goog-Signature=SECRETabc", "SECRETabc"),
    ("encoded X-Amz", "u=https%3A%2F%2Fs3%2Fk%3FX-Amz-Signature%3DSECRETabc%26a%3Db", "SECRETabc"),
    ("x-api-key header", "request headers: x-api-key: SECRETabc", "SECRETabc"),
    ("x-api-key dict", "{'X-Api-Key': 'SECRETabc', 'Accept': '*/*'}", "SECRETabc"),
    ("cookie header", "Cookie: session=SECRETabc; theme=dark", "SECRETabc"),
    ("cookie dict", "{'Cookie': 'a=1; sid=SECRETabc'}", "SECRETabc"),
    ("set-cookie", "Set-Cookie: sid=SECRETabc; Path=/; HttpOnly", "SECRETabc"),
    ("redis password with /", "connecting to redis://:SECRET/abc@redis.internal:6379/0", "SECRET/abc"),
    ("redis password with @", "to rediss://default:SECRET@xyz@redis.internal:6380/1", "SECRET@xyz"),
    ("sentinel password", "sentinel://:pa/ss@wordSECRET@s1:26379", "wordSECRET"),
]


@pytest.mark.parametrize(("what", "line", "secret"), _LEAKY_LINES, ids=[w for w, _, _ in _LEAKY_LINES])
def test_log_redaction_catches_the_missed_forms(what: str, line: str, secret: str) -> None:
    """#11.9: each form the log filter used to miss is masked."""
    from workers.logging_setup import redact

    out = redact(line)
    for piece in secret.replace("@", "/").split("/"):  # no part of a password with / or @ either
        assert piece not in out, f"{what}: {out}"
    assert "***" in out


def test_log_redaction_keeps_ordinary_text() -> None:
    """#11.9: hosts, ports, paths and non-secret parameters stay readable."""
    from workers.logging_setup import redact

    for line in (
        "redis at redis://redis.internal:6379/0 is up",
        "GET https://api.awork.com:443/api/v1/users/me@example.com",
        "signature check ok for block 0003",
        "the cookie jar is empty",
    ):
        assert redact(line) == line, line
    kept = redact("https://b.example/c?sv=1&sig=abc&se=2030-01-01")
    assert "se=2030-01-01" in kept and "b.example/c" in kept
    assert redact("redis://:pw@r.internal:6379/0") == "redis://:***@r.internal:6379/0"


# -- #11.2 end to end: failure paths leak nothing -----------------------------------------------

LEAK = re.compile(r"sig=|sig%3D|TOPSECRET", re.IGNORECASE)


@pytest.mark.slow
def test_failure_paths_leak_no_url_to_redis_logs_cli_or_flower(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """#11.2: connection refused at the upload host, a blob host that drops connections and a
    signed source URL that fails: the jobs end dead, and no `sig=` is in Redis, the worker logs,
    `status` / `dead list` output or Flower's API (its task-retried / task-failed tracebacks)."""
    from ops.demo_files import random_file
    from ops.flower import FlowerProcess
    from producers.canvas import publisher_app
    from producers.client import Uploads
    from producers.config import SharedSettings
    from producers.keys import job_key
    from producers.records import JobStore
    from producers.redrive import canvas_from
    from tests.fleet import API_KEY, SECOND_KEY, Fleet
    from tests.redis_scan import redis_contents

    blob_port, refused_upload, refused_source = free_port(), _closed_port(), _closed_port()
    fleet = Fleet(
        tmp_path_factory.mktemp("leaks"),
        worker_count=1,
        sandbox_args=["--blob-port", str(blob_port)],
        extra_env={
            "AWORK_UPLOAD_HOSTS": f"127.0.0.1:{blob_port},127.0.0.1:{refused_upload}",
            "AWORK_SOURCE_URL_HOSTS": f"127.0.0.1:{refused_source}",
            "AWORK_MAX_ATTEMPTS": "2",
        },
    ).start()
    flower = FlowerProcess(fleet.env, basic_auth="ops:" + uuid.uuid4().hex).start()
    try:
        entity = fleet.entity("tasks")
        warm = fleet.uploads.enqueue(random_file(tmp_path / "warm.bin", 100), to=f"task:{entity}")
        flower.wait_for_tasks(lambda ts: any(warm.id in str(t.get("kwargs")) for t in ts.values()))
        fleet.wait([warm], timeout=30)

        # 1. the upload host refuses connections: a record as step 1 writes it, its URL signed
        job_id = uuid.uuid4().hex
        staged = Path(fleet.env["STAGING_DIR"]) / job_id / "a.bin"
        staged.parent.mkdir()
        random_file(staged, 2000)
        now = time.time()
        record = {
            "id": job_id, "state": "queued", "workspace": "default", "target": f"task:{entity}",
            "route": "byuploadid", "file_name": "a.bin", "content_type": "application/octet-stream",
            "source_kind": "file", "source": str(staged), "staged_owned": "0", "published": "1",
            "created_at": repr(now), "updated_at": repr(now), "upload_id": uuid.uuid4().hex,
            "upload_url": f"http://127.0.0.1:{refused_upload}/uploads/a.bin?sv=2021&sp=cw&{SECRET_SIG}",
            "upload_url_issued_at": repr(now), "upload_url_expires": repr(now + 3600),
        }
        JobStore(redis.Redis.from_url(fleet.env["REDIS_URL"])).create(record, None)
        app = publisher_app(fleet.env["REDIS_URL"])
        canvas_from(app, record, "put").apply_async()
        app.close()

        # 2. a blob host that drops every connection (sandbox URLs carry sig=)
        fleet.sandbox.set_faults({"routes": {"blob": {"drop": 1.0}}})
        dropped = fleet.uploads.enqueue(random_file(tmp_path / "d.bin", 5000), to=f"task:{entity}")

        # 3. a signed source URL whose host refuses connections
        for key in ("REDIS_URL", "STAGING_DIR", "AWORK_WORKSPACES_FILE", "AWORK_SOURCE_URL_HOSTS"):
            monkeypatch.setenv(key, fleet.env[key])
        with Uploads(SharedSettings.from_env()) as producer:
            signed = producer.enqueue(
                f"http://127.0.0.1:{refused_source}/private/r.pdf?sv=1&se=2099-01-01&{SECRET_SIG}",
                to=f"task:{entity}",
            )
        ids = [job_id, dropped.id, signed.id]
        finals = fleet.uploads.wait_many(ids, timeout=120)
        assert [j.state.value for j in finals] == ["dead"] * 3, [j.to_json() for j in finals]

        # Flower has seen the retries and the failures, with their tracebacks
        def ended(ts: dict[str, Any]) -> bool:
            return sum(1 for t in ts.values() if t.get("state") == "FAILURE" and t.get("traceback")) >= 3

        tasks = flower.wait_for_tasks(ended, timeout=30)
        infos = [flower.get(f"/api/task/info/{tid}").text for tid in tasks]

        cli = [str(Path(sys.executable).parent / "awork-uploads")]
        commands = (
            ["status", *ids],
            ["status", "--json", *ids], ["dead", "list"],
            ["dead", "list", "--json"],
        )
        outputs = [
            subprocess.run(cli + c, env=fleet.env, capture_output=True, text=True, timeout=60, check=True)
            for c in commands
        ]
        assert all(i in outputs[2].stdout for i in ids)

        haystacks: list[tuple[str, str]] = [("flower /api/tasks", json.dumps(tasks))]
        haystacks += [("flower /api/task/info", t) for t in infos]
        haystacks += [(f"cli {o.args[1:]}", o.stdout + o.stderr) for o in outputs]
        haystacks += [(p.name, p.read_text(errors="replace")) for p in (fleet.root / "logs").glob("*.log")]
        # The one place a signed source URL must stay: the `source` field of its own record
        # (the worker fetches it from there; `dead retry` needs it).
        client = redis.Redis.from_url(fleet.env["REDIS_URL"])
        assert b"sig=" in (client.hget(job_key(signed.id), "source") or b"")
        haystacks += redis_contents(client, {job_key(signed.id).encode(): {b"source"}})
        for where, text in haystacks:
            assert API_KEY not in text and SECOND_KEY not in text, f"API key in {where}"
            found = LEAK.search(text)
            context = text[max(0, found.start() - 200) : found.end() + 50] if found else ""
            assert not found, f"signed URL in {where}: ...{context}"
        # the errors still say what went wrong: host and exception class
        refused_host = f"http://127.0.0.1:{refused_upload}"
        assert finals[0].error is not None and refused_host in (finals[0].error.description or "")
        assert "ConnectionError" in (finals[0].error.description or "")
        assert finals[2].error is not None and finals[2].error.code == "source-unreachable"
    finally:
        flower.stop()
        fleet.stop()


def test_max_source_bytes_is_read_once_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """#11.11: AWORK_MAX_SOURCE_BYTES reaches the worker settings; nonsense names the variable."""
    from producers.config import ConfigError
    from workers.settings import WorkerSettings
    from workers.url_source import DEFAULT_MAX_SOURCE_BYTES

    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    monkeypatch.delenv("AWORK_MAX_SOURCE_BYTES", raising=False)
    assert WorkerSettings.from_env().max_source_bytes == DEFAULT_MAX_SOURCE_BYTES == 5 * 1024 * MiB
    monkeypatch.setenv("AWORK_MAX_SOURCE_BYTES", "1048576")
    assert WorkerSettings.from_env().max_source_bytes == MiB
    for bad in ("0", "-5", "lots"):
        monkeypatch.setenv("AWORK_MAX_SOURCE_BYTES", bad)
        with pytest.raises(ConfigError, match=r"^AWORK_MAX_SOURCE_BYTES: "):
            WorkerSettings.from_env()
