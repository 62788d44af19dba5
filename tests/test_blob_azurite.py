"""The PUT path against a real Azure-compatible component: Azurite.

Small policy (threshold 1 MiB, blocks 256 KiB) so the files stay small and the tests fast.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

import workers.blob.urls as blob_urls
from ops.azurite import Azurite
from tests.azurite_util import Recorder, make_file, start_azurite_or_skip
from tests.blob_policies import SMALL, KiB, MiB, staged_digests
from workers.blob import BlobUploader, MemoryFallbackStore, TransferPolicy
from workers.block_journal import MemoryBlockJournal
from workers.errors import PermanentError, TransientError, UploadUrlExpired
from workers.sources import FileSource, md5_b64
from workers.url_source import UrlSource

CONTAINER = "uploads"


@pytest.fixture(scope="module")
def azurite() -> Iterator[Azurite]:
    az = start_azurite_or_skip()
    try:
        az.create_container(CONTAINER)
        yield az
    finally:
        az.stop()


def _uploader(az: Azurite, recorder: Recorder | None = None, policy: TransferPolicy = SMALL) -> BlobUploader:
    return BlobUploader(
        [az.host],
        policy,
        session_factory=recorder.factory if recorder else None,
        fallback_store=MemoryFallbackStore(),
    )


@pytest.mark.parametrize(
    ("size", "mode", "blocks"),
    [
        (1 * MiB, "single", 0),  # 1 MiB, and exactly the threshold
        (1 * MiB - 1, "single", 0),
        (1 * MiB + 1, "blocks", 5),
        (3 * MiB + 12345, "blocks", 13),
        (0, "single", 0),
    ],
)
def test_sizes_arrive_byte_exact(azurite: Azurite, tmp_path: Path, size: int, mode: str, blocks: int) -> None:
    data = make_file(tmp_path / "f.bin", size)
    name = f"sizes-{size}.bin"
    seen: list[tuple[int, int]] = []
    with _uploader(azurite) as up:
        out = up.upload(
            azurite.blob_sas_url(CONTAINER, name),
            FileSource(tmp_path / "f.bin"),
            content_type="video/mp4",
            progress=lambda done, total: seen.append((done, total)),
        )
    assert (out.size, out.mode, out.blocks_sent, out.md5_b64) == (size, mode, blocks, md5_b64(data))
    assert azurite.read_blob(CONTAINER, name) == data
    props = azurite.blob_properties(CONTAINER, name)
    assert props["content-type"] == "video/mp4"
    assert props["content-md5"] == md5_b64(data)  # Put Block List set x-ms-blob-content-md5
    assert seen[-1] == (size, size)


def test_default_policy_70_mib(azurite: Azurite, tmp_path: Path) -> None:
    data = make_file(tmp_path / "big.bin", 70 * MiB + 7)
    with BlobUploader([azurite.host], fallback_store=MemoryFallbackStore()) as up:
        out = up.upload(
            azurite.blob_sas_url(CONTAINER, "big.bin"),
            FileSource(tmp_path / "big.bin"),
            content_type="application/zip",
        )
    assert out.mode == "blocks" and out.blocks_sent == 9  # 8 MiB blocks
    size, md5 = azurite.blob_md5(CONTAINER, "big.bin")
    assert (size, md5) == (len(data), md5_b64(data))


def test_wrong_content_md5_is_rejected_by_the_server(azurite: Azurite, tmp_path: Path) -> None:
    make_file(tmp_path / "f.bin", 100 * KiB)
    wrong = md5_b64(b"something else")
    rec = Recorder()
    with _uploader(azurite, rec) as up, pytest.raises(PermanentError) as info:
        up.upload(
            azurite.blob_sas_url(CONTAINER, "wrong-md5.bin"),
            FileSource(tmp_path / "f.bin", md5_b64=wrong),
            content_type="application/octet-stream",
        )
    assert info.value.status == 400 and info.value.code == "Md5Mismatch"
    assert info.value.trace_id  # x-ms-request-id kept for support
    assert len(rec.sent) == 1  # re-hashing showed the file, not the wire, was wrong: no retry
    assert rec.sent[0].headers["Content-MD5"] == wrong
    r = requests.head(azurite.blob_sas_url(CONTAINER, "wrong-md5.bin", permissions="r"), timeout=5)
    assert r.status_code == 404  # nothing was stored


def test_staged_block_md5s_are_checked_by_azurite(azurite: Azurite, tmp_path: Path) -> None:
    """Blocks sent with staging's MD5s: a good file commits, one changed after staging does not."""
    data = make_file(tmp_path / "f.bin", 5 * SMALL.block_size + 99)
    digests = staged_digests(data)
    with _uploader(azurite) as up:
        out = up.upload(
            azurite.blob_sas_url(CONTAINER, "staged.bin"),
            FileSource(tmp_path / "f.bin", md5_b64(data), digests),
            content_type="application/octet-stream",
        )
    assert out.staged_block_md5s and azurite.blob_md5(CONTAINER, "staged.bin") == (len(data), md5_b64(data))
    changed = bytearray(data)
    changed[2 * SMALL.block_size] ^= 1
    (tmp_path / "f.bin").write_bytes(changed)
    with _uploader(azurite) as up, pytest.raises(PermanentError) as info:
        up.upload(
            azurite.blob_sas_url(CONTAINER, "changed.bin"),
            FileSource(tmp_path / "f.bin", md5_b64(data), digests),
            content_type="application/octet-stream",
        )
    assert info.value.code == "source-changed" and info.value.status == 400
    r = requests.head(azurite.blob_sas_url(CONTAINER, "changed.bin", permissions="r"), timeout=5)
    assert r.status_code == 404  # never committed


def test_block_corrupted_in_flight_is_rejected_and_sent_again(azurite: Azurite, tmp_path: Path) -> None:
    data = make_file(tmp_path / "f.bin", 2 * MiB)
    corrupted: set[str] = set()

    class Flip:
        def __init__(self, body: Any) -> None:
            self.body = body
            self.first = True

        def __len__(self) -> int:
            return len(self.body)

        def read(self, n: int = -1) -> bytes:
            chunk = bytes(self.body.read(n))
            if self.first and chunk:
                self.first = False
                chunk = bytes([chunk[0] ^ 0x01]) + chunk[1:]
            return chunk

        def __iter__(self) -> Iterator[bytes]:
            while chunk := self.read(64 * KiB):
                yield chunk

    def fault(req: requests.PreparedRequest) -> None:
        qs = parse_qs(urlsplit(req.url or "").query)
        if qs.get("comp") == ["block"] and qs["blockid"][0] not in corrupted and len(corrupted) < 2:
            corrupted.add(qs["blockid"][0])
            req.body = Flip(req.body)  # type: ignore[assignment]

    rec = Recorder(fault)
    with _uploader(azurite, rec) as up:
        out = up.upload(
            azurite.blob_sas_url(CONTAINER, "corrupt.bin"),
            FileSource(tmp_path / "f.bin"),
            content_type="application/octet-stream",
        )
    assert len(corrupted) == 2 and out.retries == 2
    blocks = rec.blocks()
    assert all(blocks.count(b) == 2 for b in corrupted)
    assert azurite.read_blob(CONTAINER, "corrupt.bin") == data


def test_expired_sas_is_recognised_before_sending(azurite: Azurite, tmp_path: Path) -> None:
    make_file(tmp_path / "f.bin", 10 * KiB)
    rec = Recorder()
    with _uploader(azurite, rec) as up, pytest.raises(UploadUrlExpired):
        up.upload(
            azurite.blob_sas_url(CONTAINER, "expired.bin", expires_in=-60),
            FileSource(tmp_path / "f.bin"),
            content_type="text/plain",
        )
    assert rec.sent == []


@pytest.mark.parametrize("kind", ["expired-at-server", "not-yet-valid", "bad-signature"])
def test_server_refusing_the_sas_means_new_url(
    azurite: Azurite, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    make_file(tmp_path / "f.bin", 2 * MiB)  # the block route
    if kind == "expired-at-server":
        # Our clock says the URL is still good (its expiry is not read); Azurite's says it is not.
        monkeypatch.setattr(blob_urls, "url_expiry", lambda url: None)
        url = azurite.blob_sas_url(CONTAINER, f"{kind}.bin", expires_in=-5)
    elif kind == "not-yet-valid":
        url = azurite.blob_sas_url(CONTAINER, f"{kind}.bin", start_offset=600)
    else:
        url = azurite.blob_sas_url(CONTAINER, f"{kind}.bin").replace("sig=", "sig=AAAA")
    with _uploader(azurite) as up, pytest.raises(UploadUrlExpired) as info:
        up.upload(url, FileSource(tmp_path / "f.bin"), content_type="text/plain")
    assert info.value.status == 403 and info.value.code == "AuthorizationFailure"


def test_upload_host_not_allowed_sends_nothing(azurite: Azurite, tmp_path: Path) -> None:
    make_file(tmp_path / "f.bin", 10 * KiB)
    rec = Recorder()
    up = BlobUploader(["blob.example.com", "127.0.0.1:1"], SMALL, session_factory=rec.factory)
    with pytest.raises(PermanentError) as info:
        up.upload(
            azurite.blob_sas_url(CONTAINER, "nope.bin"), FileSource(tmp_path / "f.bin"), content_type="x/y"
        )
    assert info.value.code == "upload-host-refused"
    assert rec.sent == []


def test_journal_resume_sends_only_missing_blocks(azurite: Azurite, tmp_path: Path) -> None:
    data = make_file(tmp_path / "f.bin", 3 * MiB)  # 12 blocks
    url = azurite.blob_sas_url(CONTAINER, "resume.bin")
    journal = MemoryBlockJournal()
    calls = {"n": 0}
    lock = threading.Lock()

    def die_after_five(req: requests.PreparedRequest) -> None:
        if "comp=block" in (req.url or ""):
            with lock:
                calls["n"] += 1
                if calls["n"] > 5:
                    raise requests.ConnectionError("the worker's network went away")

    first = Recorder(die_after_five)
    policy = TransferPolicy(single_put_threshold=MiB, block_size=256 * KiB, block_retries=0)
    with _uploader(azurite, first, policy) as up, pytest.raises(TransientError):
        up.upload(url, FileSource(tmp_path / "f.bin"), content_type="x/y", journal=journal)
    acked = journal.acked()
    assert 1 <= len(acked) <= 5

    second = Recorder()
    with _uploader(azurite, second) as up:
        out = up.upload(url, FileSource(tmp_path / "f.bin"), content_type="x/y", journal=journal)
    resent = set(second.blocks())
    assert resent.isdisjoint(acked)
    assert len(resent) == 12 - len(acked) == out.blocks_sent
    assert out.blocks_skipped == len(acked)
    assert second.comps().count("blocklist") == 1
    assert azurite.read_blob(CONTAINER, "resume.bin") == data


def test_no_authorization_header_ever_reaches_the_upload_host(azurite: Azurite, tmp_path: Path) -> None:
    data = make_file(tmp_path / "f.bin", 1536 * KiB)
    rec = Recorder()
    rec.hostile = True  # a session factory that carries the awork key and basic auth
    with _uploader(azurite, rec) as up:
        up.upload(
            azurite.blob_sas_url(CONTAINER, "noauth.bin"), FileSource(tmp_path / "f.bin"), content_type="x/y"
        )
        make_file(tmp_path / "small.bin", 1000)
        up.upload(
            azurite.blob_sas_url(CONTAINER, "noauth2.bin"),
            FileSource(tmp_path / "small.bin"),
            content_type="x/y",
        )
    assert len(rec.sent) == 6 + 1 + 1  # 6 blocks + the list, then 1 Put Blob
    for req in rec.sent:
        assert "Authorization" not in req.headers
        assert "Proxy-Authorization" not in req.headers
    assert azurite.read_blob(CONTAINER, "noauth.bin") == data


class _SourceHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    data = b""

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.data)))
        self.end_headers()
        view = memoryview(self.data)
        for i in range(0, len(view), 64 * KiB):
            self.wfile.write(view[i : i + 64 * KiB])


@pytest.mark.parametrize("size", [200 * KiB, 3 * MiB + 5])
def test_url_source_streams_to_the_blob_without_a_temp_file(
    azurite: Azurite, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    import os
    import tempfile

    data = os.urandom(size)
    handler = type("H", (_SourceHandler,), {"data": data})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()

    def no_disk(*a: Any, **k: Any) -> Any:
        raise AssertionError("a URL source must not touch disk")

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", no_disk)
    monkeypatch.setattr(tempfile, "TemporaryFile", no_disk)
    monkeypatch.setattr(tempfile, "SpooledTemporaryFile", no_disk)
    try:
        src = UrlSource(f"http://127.0.0.1:{server.server_address[1]}/video.mp4", requests.Session())
        with _uploader(azurite) as up:
            out = up.upload(azurite.blob_sas_url(CONTAINER, f"url-{size}.bin"), src, content_type="video/mp4")
    finally:
        server.shutdown()
        server.server_close()
    assert out.md5_b64 == md5_b64(data)
    assert out.mode == ("single" if size <= SMALL.block_size else "blocks")
    assert azurite.read_blob(CONTAINER, f"url-{size}.bin") == data
    assert azurite.blob_properties(CONTAINER, f"url-{size}.bin")["content-md5"] == md5_b64(data)
