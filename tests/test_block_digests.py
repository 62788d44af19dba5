"""Block MD5s taken while staging: cut right whatever the read sizes, written only for files that
go up as blocks, removed with the job's folder, and used by the transfer engine instead of
hashing - with a changed file still never committed."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest

import workers.blob.blocks
from producers import staging
from producers.block_digests import BlockDigests, BlockHasher, block_size_for, sidecar_path
from producers.job_ids import new_job_id
from tests.azurite_util import make_file
from tests.blob_fake_host import FakeBlobHost
from tests.blob_policies import SMALL, KiB, MiB, staged_digests
from workers.blob import BlobUploader, MemoryFallbackStore, block_id
from workers.errors import PermanentError
from workers.sources import FileSource, md5_b64

BLOCK = SMALL.block_size
THRESHOLD = SMALL.single_put_threshold


@pytest.fixture
def fake() -> Iterator[FakeBlobHost]:
    with FakeBlobHost() as host:
        yield host


@pytest.mark.parametrize("chunk", [1000, BLOCK, BLOCK + 1, 3 * BLOCK + 7])
def test_hasher_cuts_blocks_whatever_the_chunks(chunk: int) -> None:
    data = bytes(range(256)) * (5 * BLOCK // 256) + b"tail"
    hasher = BlockHasher(BLOCK)
    for i in range(0, len(data), chunk):
        hasher.update(data[i : i + chunk])
    assert hasher.finish() == staged_digests(data).blocks


def test_digests_round_trip_and_refuse_what_is_malformed() -> None:
    d = BlockDigests(5 * BLOCK + 4, BLOCK, md5_b64(b"x"), tuple(md5_b64(bytes([i])) for i in range(6)))
    assert BlockDigests.parse(d.dump()) == d
    assert d.fits(5 * BLOCK + 4, BLOCK, md5_b64(b"x"))
    assert not d.fits(5 * BLOCK + 4, 2 * BLOCK, md5_b64(b"x"))  # workers cut other blocks
    assert not d.fits(5 * BLOCK + 5, BLOCK, md5_b64(b"x"))
    assert not d.fits(5 * BLOCK + 4, BLOCK, md5_b64(b"y"))
    assert not d.fits(5 * BLOCK + 4, BLOCK, None)
    text = d.dump()
    for bad in (
        "",
        "nonsense\n",
        text.replace("size ", "sise "),
        text + "short\n",
        text[: text.rindex("\n", 0, -1)],
    ):
        parsed = BlockDigests.parse(bad)
        assert parsed is None or not parsed.fits(5 * BLOCK + 4, BLOCK, md5_b64(b"x")), bad


def test_block_size_grows_only_past_azures_block_count() -> None:
    assert block_size_for(100 * MiB, 8 * MiB) == 8 * MiB
    huge = 50_000 * 8 * MiB + 1
    grown = block_size_for(huge, 8 * MiB)
    assert grown > 8 * MiB and grown % MiB == 0 and math.ceil(huge / grown) <= 50_000


def test_staging_writes_digests_only_for_files_that_go_up_as_blocks(tmp_path: Path) -> None:
    root = tmp_path / "staging"
    job1, job2, job3 = (new_job_id() for _ in range(3))
    big = make_file(tmp_path / "big.bin", THRESHOLD + 3 * KiB)
    staged = staging.stage_file(tmp_path / "big.bin", root, job1, "big.bin", THRESHOLD, BLOCK)
    digests = BlockDigests.load(sidecar_path(root, job1))
    assert digests is not None and staged.md5_b64 == md5_b64(big)
    assert digests == staged_digests(big)
    make_file(tmp_path / "small.bin", THRESHOLD)
    staging.stage_file(tmp_path / "small.bin", root, job2, "small.bin", THRESHOLD, BLOCK)
    assert not sidecar_path(root, job2).exists()
    # a file already in staging is referenced in place: nothing hashed, nothing written
    staging.stage_file(staged.path, root, job3, "again.bin", THRESHOLD, BLOCK)
    assert not sidecar_path(root, job3).exists()
    staging.remove_job_dir(root, job1)
    assert not sidecar_path(root, job1).exists() and not staged.path.exists()


def _uploader(fake: FakeBlobHost) -> BlobUploader:
    return BlobUploader([fake.host], SMALL, fallback_store=MemoryFallbackStore())


def _count_hashing(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    sizes: list[int] = []
    real = workers.blob.blocks.md5_b64

    def counting(data: bytes) -> str:
        sizes.append(len(data))
        return real(data)

    monkeypatch.setattr(workers.blob.blocks, "md5_b64", counting)
    return sizes


def test_staged_digests_spare_the_worker_every_hash(
    fake: FakeBlobHost, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = make_file(tmp_path / "f.bin", 7 * BLOCK + 5)
    digests = staged_digests(data)
    hashed = _count_hashing(monkeypatch)
    with _uploader(fake) as up:
        out = up.upload(
            fake.url("s.bin"), FileSource(tmp_path / "f.bin", md5_b64(data), digests), content_type="x/y"
        )
    assert fake.blob("s.bin") == data and out.mode == "blocks" and out.md5_b64 == md5_b64(data)
    assert fake.blobs["/uploads/s.bin"][1]["content-md5"] == md5_b64(data)
    assert all(size < 4 * KiB for size in hashed), hashed  # only the block list's small XML body
    # without them, every block is hashed here
    hashed.clear()
    with _uploader(fake) as up:
        up.upload(fake.url("t.bin"), FileSource(tmp_path / "f.bin", md5_b64(data)), content_type="x/y")
    assert hashed.count(BLOCK) == 7 and 5 in hashed


def test_a_block_changed_after_staging_is_refused_and_never_committed(
    fake: FakeBlobHost, tmp_path: Path
) -> None:
    staged = make_file(tmp_path / "f.bin", 6 * BLOCK)
    digests = staged_digests(staged)
    changed = bytearray(staged)
    changed[3 * BLOCK + 10] ^= 0xFF  # the staged copy rots (or is written to) before the upload
    (tmp_path / "f.bin").write_bytes(changed)
    with _uploader(fake) as up, pytest.raises(PermanentError) as info:
        up.upload(
            fake.url("rot.bin"), FileSource(tmp_path / "f.bin", md5_b64(staged), digests), content_type="x/y"
        )
    assert info.value.code == "source-changed"
    refused = [r for r in fake.requests_for("rot.bin", "block") if r.block_id == block_id(3)]
    assert refused and all(r.status == 400 for r in refused) and len(refused) == 1  # not retried
    assert fake.requests_for("rot.bin", "blocklist") == []


def test_a_block_corrupted_on_the_way_is_still_sent_again(fake: FakeBlobHost, tmp_path: Path) -> None:
    data = make_file(tmp_path / "f.bin", 5 * BLOCK)
    digests = staged_digests(data)
    fake.switches.corrupt_once = {block_id(2)}
    with _uploader(fake) as up:
        out = up.upload(
            fake.url("c.bin"), FileSource(tmp_path / "f.bin", md5_b64(data), digests), content_type="x/y"
        )
    assert out.retries == 1 and fake.blob("c.bin") == data


def test_digests_that_do_not_fit_are_ignored(fake: FakeBlobHost, tmp_path: Path) -> None:
    data = make_file(tmp_path / "f.bin", 6 * BLOCK)
    other_cut = staged_digests(data, 2 * BLOCK)
    with _uploader(fake) as up:
        up.upload(
            fake.url("o.bin"), FileSource(tmp_path / "f.bin", md5_b64(data), other_cut), content_type="x/y"
        )
    assert fake.blob("o.bin") == data
