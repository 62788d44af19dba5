"""The transfer engine against a fault-injecting Azure-like host (tests/blob_fake_host.py)."""

from __future__ import annotations

import hashlib
import itertools
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import fakeredis
import pytest
import redis
import requests
from requests_toolbelt.multipart.decoder import MultipartDecoder

from ops.redis_server import RedisServer
from tests.azurite_util import make_file
from tests.blob_fake_host import FakeBlobHost
from tests.blob_policies import SMALL, KiB, MiB
from workers.blob import (
    BlobUploader,
    MemoryFallbackStore,
    RedisFallbackStore,
    TransferPolicy,
    block_id,
)
from workers.block_journal import MemoryBlockJournal, RedisBlockJournal
from workers.errors import PermanentError, TransientError, UploadUrlExpired
from workers.multipart import multipart_body
from workers.sources import FileSource, md5_b64
from workers.url_source import UrlSource

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def fake() -> Iterator[FakeBlobHost]:
    with FakeBlobHost() as host:
        yield host


def _uploader(fake: FakeBlobHost, policy: TransferPolicy = SMALL, store: object = None) -> BlobUploader:
    return BlobUploader([fake.host], policy, fallback_store=store or MemoryFallbackStore())  # type: ignore[arg-type]


def test_corrupted_block_is_rejected_and_sent_again(fake: FakeBlobHost, tmp_path: Path) -> None:
    data = make_file(tmp_path / "f.bin", 2 * MiB)
    fake.switches.corrupt_once = {block_id(1), block_id(6)}
    with _uploader(fake) as up:
        out = up.upload(fake.url("c.bin"), FileSource(tmp_path / "f.bin"), content_type="image/png")
    assert out.retries == 2 and out.blocks_sent == 8
    for bid in (block_id(1), block_id(6)):
        assert [r.status for r in fake.requests_for("c.bin", "block") if r.block_id == bid] == [400, 201]
    assert fake.blob("c.bin") == data
    assert fake.blobs["/uploads/c.bin"][1] == {"content-type": "image/png", "content-md5": md5_b64(data)}


def test_server_busy_is_retried(fake: FakeBlobHost, tmp_path: Path) -> None:
    data = make_file(tmp_path / "f.bin", 2 * MiB)
    fake.switches.fail_503 = 3
    with _uploader(fake) as up:
        out = up.upload(fake.url("b.bin"), FileSource(tmp_path / "f.bin"), content_type="x/y")
    assert out.retries == 3
    assert fake.blob("b.bin") == data


def test_server_busy_for_good_is_transient_and_keeps_the_acks(fake: FakeBlobHost, tmp_path: Path) -> None:
    make_file(tmp_path / "f.bin", 2 * MiB)
    policy = TransferPolicy(
        single_put_threshold=MiB, block_size=256 * KiB, parallel_blocks=1, block_retries=2, retry_backoff=0.01
    )
    journal = MemoryBlockJournal()
    fake.switches.busy_after_blocks = 2
    with _uploader(fake, policy) as up, pytest.raises(TransientError) as info:
        up.upload(fake.url("busy.bin"), FileSource(tmp_path / "f.bin"), content_type="x/y", journal=journal)
    assert info.value.status == 503 and info.value.code == "ServerBusy" and info.value.trace_id
    assert set(journal.acked()) == {block_id(0), block_id(1)}


def test_block_ops_refused_fall_back_to_one_put_and_are_remembered(
    fake: FakeBlobHost, tmp_path: Path
) -> None:
    data = make_file(tmp_path / "f.bin", 2 * MiB)
    fake.switches.refuse_blocks = True
    store = MemoryFallbackStore()
    with _uploader(fake, store=store) as up:
        out = up.upload(fake.url("fb.bin"), FileSource(tmp_path / "f.bin"), content_type="x/y")
        assert (out.mode, out.fell_back, out.md5_b64) == ("single", True, md5_b64(data))
        assert fake.blob("fb.bin") == data
        assert store.refuses_blocks(fake.host)
        put = fake.requests_for("fb.bin", None)
        assert len(put) == 1 and put[0].headers["content-md5"] == md5_b64(data)

        out2 = up.upload(fake.url("fb2.bin"), FileSource(tmp_path / "f.bin"), content_type="x/y")
    assert out2.mode == "single"
    assert [r.comp for r in fake.requests_for("fb2.bin")] == [None]  # no block attempt at all


def test_fallback_memory_in_redis_is_shared_by_the_fleet(fake: FakeBlobHost, tmp_path: Path) -> None:
    make_file(tmp_path / "f.bin", 2 * MiB)
    client = fakeredis.FakeRedis()
    fake.switches.refuse_blocks = True
    with _uploader(fake, store=RedisFallbackStore(client)) as up:
        up.upload(fake.url("r1.bin"), FileSource(tmp_path / "f.bin"), content_type="x/y")
    assert client.ttl(RedisFallbackStore.key(fake.host)) > 0
    # Another worker process (its own local cache) learns it from Redis.
    with _uploader(fake, store=RedisFallbackStore(client)) as up:
        up.upload(fake.url("r2.bin"), FileSource(tmp_path / "f.bin"), content_type="x/y")
    assert [r.comp for r in fake.requests_for("r2.bin")] == [None]


def test_url_expiring_mid_upload(fake: FakeBlobHost, tmp_path: Path) -> None:
    data = make_file(tmp_path / "f.bin", 2 * MiB)  # 8 blocks
    fake.switches.expire_after_blocks = 3
    policy = TransferPolicy(
        single_put_threshold=MiB, block_size=256 * KiB, parallel_blocks=1, retry_backoff=0.01
    )
    journal = MemoryBlockJournal()
    with _uploader(fake, policy) as up:
        with pytest.raises(UploadUrlExpired) as info:
            up.upload(
                fake.url("exp.bin"), FileSource(tmp_path / "f.bin"), content_type="x/y", journal=journal
            )
        assert info.value.status == 403 and info.value.code == "AuthenticationFailed"
        assert set(journal.acked()) == {block_id(0), block_id(1), block_id(2)}
        statuses = [r.status for r in fake.requests_for("exp.bin")]
        assert statuses == [201, 201, 201, 403]  # no retry of an expired URL

        # A new URL for the same blob: its uncommitted blocks are still there, resume.
        fake.switches.expire_after_blocks = None
        n_before = len(fake.requests_for("exp.bin"))
        out = up.upload(
            fake.url("exp.bin"), FileSource(tmp_path / "f.bin"), content_type="x/y", journal=journal
        )
        assert (out.blocks_sent, out.blocks_skipped) == (5, 3)
        assert {r.block_id for r in fake.requests_for("exp.bin", "block")[n_before:]}.isdisjoint(
            {block_id(0), block_id(1), block_id(2)}
        )
        assert fake.blob("exp.bin") == data

        # A new URL for another blob (what awork hands out): the old acks are not trusted.
        fake.switches.expire_after_blocks = 2
        with pytest.raises(UploadUrlExpired):
            up.upload(
                fake.url("exp2.bin"), FileSource(tmp_path / "f.bin"), content_type="x/y", journal=journal
            )
        fake.switches.expire_after_blocks = None
        out = up.upload(
            fake.url("exp3.bin"), FileSource(tmp_path / "f.bin"), content_type="x/y", journal=journal
        )
    assert (out.blocks_sent, out.blocks_skipped) == (8, 0)
    assert fake.blob("exp3.bin") == data


def test_blocks_lost_by_the_server_are_sent_again(fake: FakeBlobHost, tmp_path: Path) -> None:
    data = make_file(tmp_path / "f.bin", 2 * MiB)
    fake.switches.lose_blocks_once = True
    journal = MemoryBlockJournal()
    with _uploader(fake) as up:
        out = up.upload(
            fake.url("lost.bin"), FileSource(tmp_path / "f.bin"), content_type="x/y", journal=journal
        )
    assert out.blocks_sent == 8
    assert len(fake.requests_for("lost.bin", "block")) == 16
    assert fake.blob("lost.bin") == data


def test_file_changed_since_journal_is_resent(fake: FakeBlobHost, tmp_path: Path) -> None:
    make_file(tmp_path / "f.bin", 2 * MiB)
    journal = MemoryBlockJournal()
    url = fake.url("chg.bin")
    with _uploader(fake) as up:
        up.upload(url, FileSource(tmp_path / "f.bin"), content_type="x/y", journal=journal)
        data = make_file(tmp_path / "f.bin", 2 * MiB)  # same size, other bytes
        out = up.upload(url, FileSource(tmp_path / "f.bin"), content_type="x/y", journal=journal)
    assert (out.blocks_sent, out.blocks_skipped) == (8, 0)  # the MD5s in the journal no longer match
    assert fake.blob("chg.bin") == data


# -- URL sources -------------------------------------------------------------------------------


def test_url_source_resumes_a_broken_stream_with_range(fake: FakeBlobHost) -> None:
    data = os.urandom(2 * MiB + 3)
    src_url = fake.source_url("v.mp4", data, break_at=700 * KiB)
    with _uploader(fake) as up:
        out = up.upload(fake.url("u.bin"), UrlSource(src_url, requests.Session()), content_type="video/mp4")
    assert fake.sources["/src/v.mp4"].gets == 2  # one GET, one Range GET
    assert out.md5_b64 == md5_b64(data) and out.blocks_skipped == 0
    assert fake.blob("u.bin") == data


def test_url_source_without_ranges_restarts_and_skips_acked_blocks(fake: FakeBlobHost) -> None:
    data = os.urandom(2 * MiB + 3)
    src_url = fake.source_url("w.mp4", data, ranges=False, break_at=1300 * KiB)
    with _uploader(fake) as up:
        out = up.upload(fake.url("w.bin"), UrlSource(src_url, requests.Session()), content_type="video/mp4")
    assert fake.sources["/src/w.mp4"].gets == 2
    assert out.blocks_skipped >= 1  # blocks acked in the broken pass were not sent again
    assert out.blocks_sent + out.blocks_skipped == 9
    assert fake.blob("w.bin") == data


def test_url_source_on_a_host_without_blocks_is_verified_by_the_echoed_md5(fake: FakeBlobHost) -> None:
    data = os.urandom(2 * MiB)
    fake.switches.refuse_blocks = True
    fake.switches.corrupt_put_blob_once = True  # the first streamed PUT arrives corrupted
    src_url = fake.source_url("s.bin", data)
    store = MemoryFallbackStore()
    store.remember_refusal(fake.host, "test")
    with _uploader(fake, store=store) as up:
        out = up.upload(fake.url("s.bin"), UrlSource(src_url, requests.Session()), content_type="x/y")
    puts = fake.requests_for("s.bin")
    assert [r.comp for r in puts] == [None, None]
    assert "content-md5" not in puts[0].headers  # cannot be known before streaming
    assert out.md5_b64 == md5_b64(data) and out.fell_back
    assert fake.blob("s.bin") == data


def test_url_source_of_unknown_size_on_a_host_without_blocks(fake: FakeBlobHost, tmp_path: Path) -> None:
    data = os.urandom(MiB + 17)
    src_url = fake.source_url("n.bin", data, content_length=False, ranges=False)
    store = MemoryFallbackStore()
    store.remember_refusal(fake.host, "test")
    up = BlobUploader([fake.host], SMALL, fallback_store=store, spool_dir=str(tmp_path))
    with up:
        out = up.upload(fake.url("n.bin"), UrlSource(src_url, requests.Session()), content_type="x/y")
    assert out.mode == "single" and fake.blob("n.bin") == data
    assert fake.requests_for("n.bin")[0].headers["content-md5"] == md5_b64(data)
    assert list(tmp_path.iterdir()) == []  # the spool file is gone


def test_url_source_errors(fake: FakeBlobHost) -> None:
    with _uploader(fake) as up:
        with pytest.raises(PermanentError) as info:
            up.upload(
                fake.url("e.bin"),
                UrlSource(f"http://{fake.host}/src/missing", requests.Session()),
                content_type="x/y",
            )
        assert info.value.status == 404
    with pytest.raises(PermanentError):
        UrlSource("ftp://example.com/x", requests.Session())


# -- a worker killed with SIGKILL in the middle of a multi-block upload ------------------------

CHILD = """
import sys, redis
from workers.blob import BlobUploader, MemoryFallbackStore, TransferPolicy
from workers.block_journal import RedisBlockJournal
from workers.sources import FileSource
url, path, redis_url, host = sys.argv[1:5]
policy = TransferPolicy(single_put_threshold=64 * 1024, block_size=64 * 1024, parallel_blocks=2)
journal = RedisBlockJournal(redis.Redis.from_url(redis_url), "job-killed")
with BlobUploader([host], policy, fallback_store=MemoryFallbackStore()) as up:
    out = up.upload(url, FileSource(path), content_type="application/octet-stream", journal=journal)
print(out.blocks_sent, out.blocks_skipped, flush=True)
"""


def test_worker_killed_mid_upload_resumes_without_resending_acked_blocks(
    fake: FakeBlobHost, tmp_path: Path
) -> None:
    data = make_file(tmp_path / "f.bin", 40 * 64 * KiB)  # 40 blocks
    url = fake.url("killed.bin")
    with RedisServer(tmp_path / "redis") as server:
        client = redis.Redis.from_url(server.url)
        journal = RedisBlockJournal(client, "job-killed")
        fake.switches.block_delay = 0.05
        args = [sys.executable, "-c", CHILD, url, str(tmp_path / "f.bin"), server.url, fake.host]
        child = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while len(journal.acked()) < 8:
            assert child.poll() is None, "the upload finished before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        time.sleep(0.2)  # requests the dead process had in flight reach the log
        acked = journal.acked()
        assert 8 <= len(acked) < 40
        assert client.ttl(journal.key) > 0
        first_run = len(fake.requests_for("killed.bin"))
        assert "killed.bin" not in str(fake.blobs)  # nothing committed

        fake.switches.block_delay = 0
        done = subprocess.run(args, cwd=REPO, capture_output=True, timeout=60, check=True)
        sent, skipped = map(int, done.stdout.split())
    second = fake.requests_for("killed.bin")[first_run:]
    resent = {r.block_id for r in second if r.comp == "block"}
    assert resent.isdisjoint(acked)
    assert skipped == len(acked) and sent == 40 - len(acked) == len(resent)
    assert fake.blob("killed.bin") == data


# -- progress and the multipart route ------------------------------------------------------------


def test_progress_is_throttled_and_ends_at_the_total(fake: FakeBlobHost, tmp_path: Path) -> None:
    make_file(tmp_path / "f.bin", 4 * MiB)
    calls: list[tuple[float, int, int]] = []
    fake.switches.block_delay = 0.02
    with _uploader(fake) as up:
        up.upload(
            fake.url("p.bin"),
            FileSource(tmp_path / "f.bin"),
            content_type="x/y",
            progress=lambda done, total: calls.append((time.monotonic(), done, total)),
        )
    assert calls[-1][1:] == (4 * MiB, 4 * MiB)
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(calls[:-1])]
    assert all(g >= SMALL.progress_interval * 0.9 for g in gaps)


def test_multipart_body_streams_the_file(tmp_path: Path) -> None:
    data = make_file(tmp_path / "f.bin", 8 * MiB)
    body, ctype, length = multipart_body(FileSource(tmp_path / "f.bin"), "Bericht ü.pdf", "application/pdf")
    assert ctype.startswith("multipart/form-data; boundary=")
    tracemalloc.start()
    chunks = []
    while chunk := body.read(64 * KiB):
        chunks.append(hashlib.md5(chunk).digest())  # keep nothing of the chunk itself
        assert len(chunk) <= 64 * KiB + 1024
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 2 * MiB  # never the whole 8 MiB
    body2, ctype2, length2 = multipart_body(
        FileSource(tmp_path / "f.bin"), "Bericht ü.pdf", "application/pdf"
    )
    content = body2.read()
    assert len(content) == length == length2
    (part,) = MultipartDecoder(content, ctype2).parts
    assert part.content == data
    assert b'name="File"' in part.headers[b"Content-Disposition"]
    assert part.headers[b"Content-Type"] == b"application/pdf"


def test_multipart_body_from_a_url_source_with_progress(fake: FakeBlobHost) -> None:
    data = os.urandom(3 * MiB)
    seen: list[tuple[int, int]] = []
    body, ctype, length = multipart_body(
        UrlSource(fake.source_url("m.bin", data), requests.Session()),
        "m.bin",
        "x/y",
        progress=lambda d, t: seen.append((d, t)),
    )
    content = b"".join(iter(lambda: body.read(256 * KiB), b""))
    assert len(content) == length and seen and seen[0][1] == length
    assert MultipartDecoder(content, ctype).parts[0].content == data


def test_multipart_body_refuses_more_than_awork_takes(tmp_path: Path) -> None:
    path = tmp_path / "huge.bin"
    with open(path, "wb") as f:
        f.truncate(1_000_000_001)  # sparse: no disk used
    with pytest.raises(PermanentError) as info:
        multipart_body(FileSource(path), "huge.bin", "x/y")
    assert info.value.code == "request-body-too-large"


def test_file_not_matching_its_staging_md5_is_never_committed(fake: FakeBlobHost, tmp_path: Path) -> None:
    make_file(tmp_path / "f.bin", 2 * MiB)
    with _uploader(fake) as up, pytest.raises(PermanentError) as info:
        up.upload(
            fake.url("stale.bin"),
            FileSource(tmp_path / "f.bin", md5_b64=md5_b64(b"what the producer staged")),
            content_type="x/y",
        )
    assert info.value.code == "source-changed"
    assert fake.requests_for("stale.bin", "blocklist") == []
    assert "/uploads/stale.bin" not in fake.blobs


def test_url_source_of_unknown_size_goes_up_as_blocks(fake: FakeBlobHost) -> None:
    data = os.urandom(MiB + 100)
    seen: list[tuple[int, int]] = []
    src_url = fake.source_url("chunked.bin", data, content_length=False, ranges=False)
    with _uploader(fake) as up:
        out = up.upload(
            fake.url("chunked.bin"),
            UrlSource(src_url, requests.Session()),
            content_type="x/y",
            progress=lambda d, t: seen.append((d, t)),
        )
    assert (out.mode, out.blocks_sent, out.size) == ("blocks", 5, len(data))
    assert seen[-1] == (len(data), len(data))
    assert fake.blob("chunked.bin") == data
