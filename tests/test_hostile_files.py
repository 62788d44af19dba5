"""Hostile files, job ids and spec fields (issue #11, items 3, 5, 6, 7 and 10).

Real files, FIFOs, sockets and symlinks on disk; a real redis-server; a real fleet for the
end-to-end cases. Each test names the item it covers.
"""

from __future__ import annotations

import hashlib
import os
import socket
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery

from producers import staging
from producers.broker import celery_config
from producers.cli import main as cli_main
from producers.config import ConfigError, SharedSettings
from producers.contract import SpecError
from producers.job_ids import new_job_id
from producers.safe_open import open_beneath
from producers.spec import JobSpec, validate
from producers.staging_mode import GROUP
from tests.fleet import Fleet, wait_until
from workers.errors import PermanentError
from workers.multipart import multipart_body, verified_reads
from workers.record_checks import check_record
from workers.sources import ByteSource, FileSource, md5_b64

SECRET = b"-----BEGIN PRIVATE KEY----- not for upload"


OpenSource = Callable[[dict[str, str], tuple[str, ...], Path], ByteSource]


@pytest.fixture
def open_source() -> OpenSource:
    """workers.steps.open_source, the function the put and multipart steps call."""
    from workers.steps import open_source as real

    return real


def _secret(tmp_path: Path) -> Path:
    key = tmp_path / "outside" / "id_key"
    key.parent.mkdir()
    key.write_bytes(SECRET)
    key.chmod(0o600)
    return key


def _spec(source: str | Path | bytes, **kw: object) -> JobSpec:
    return JobSpec(source, to=f"task:{uuid.uuid4()}", **kw)  # type: ignore[arg-type]


# -- #11.6 spec fields -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "kw"),
    [
        ("idempotency_key", {"idempotency_key": "k\n"}),
        ("workspace", {"workspace": "default\n"}),
        ("content_type", {"content_type": "text/plain\n"}),
        ("content_type", {"content_type": "text/plain; x=\x00"}),
        ("name", {"name": "invoice\u202efdp.exe"}),
        ("name", {"name": "a\x7fb.txt"}),
        ("name", {"name": "a\u0085b.txt"}),
        ("name", {"name": "a\u2028b.txt"}),
        ("name", {"name": "a\u200bb.txt"}),
        ("name", {"name": "é" * 128}),  # 128 characters, 256 bytes in UTF-8
        ("description", {"description": "about\x1b[31m red"}),
    ],
)
def test_spec_fields_refuse_newlines_controls_and_long_names(field: str, kw: dict[str, str]) -> None:
    """#11.6: fields are matched whole, controls and Cc/Cf/Zl/Zp names refused, 255 bytes max."""
    kw = {"name": "ok.txt", **kw}
    with pytest.raises(SpecError) as err:
        validate(_spec(b"data", **kw), None, ())
    assert err.value.field == field


def test_spec_target_with_a_newline_is_refused() -> None:
    """#11.6: the target is matched whole too."""
    with pytest.raises(SpecError) as err:
        validate(JobSpec(b"x", to=f"task:{uuid.uuid4()}\n", name="a.txt"), None, ())
    assert err.value.field == "to"


def test_spec_file_name_is_nfc_and_counts_bytes() -> None:
    """#11.6: names are NFC-normalised; 255 bytes pass, a description may span lines."""
    v = validate(_spec(b"x", name="Caf\u0065\u0301.txt", description="line 1\nline 2\t."), None, ())
    assert v.file_name == "Caf\u00e9.txt"
    assert validate(_spec(b"x", name="é" * 127 + "a"), None, ()).file_name == "é" * 127 + "a"


def test_worker_rechecks_the_fields_it_reads_from_a_record() -> None:
    """#11.6: a record written straight into Redis fails its job (`record-invalid`), naming the
    field, instead of sending a spoofing name to awork."""
    job_id = new_job_id()
    good = {"id": job_id, "file_name": "invoice.pdf", "content_type": "application/pdf"}
    check_record(job_id, good)
    for field, bad in (
        ("file_name", {"file_name": "invoice\u202efdp.exe"}),
        ("file_name", {"file_name": "a\nb"}),
        ("description", {"description": "x\x00"}),
        ("content_type", {"content_type": "text/plain\r\nX-Evil: 1"}),
        ("id", {"id": "../../etc"}),
    ):
        with pytest.raises(PermanentError) as err:
            check_record(job_id, {**good, **bad})
        assert err.value.code == "record-invalid" and field in str(err.value)


# -- #11.3 files: open once, no symlinks, no FIFOs, at most the size seen ------------------------


def test_producer_refuses_fifos_devices_sockets_and_symlinks_at_once(tmp_path: Path) -> None:
    """#11.3: a FIFO (no writer: opening it must not hang), a device, a socket and a symlink are
    refused by validation with an error naming the field."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    sock_path = tmp_path / "sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    link = tmp_path / "link.txt"
    link.symlink_to(_secret(tmp_path))
    try:
        for path, words in (
            (fifo, "FIFO"),
            (Path("/dev/null"), "device"),
            (sock_path, "socket"),
            (link, "symbolic link"),
        ):
            started = time.monotonic()
            with pytest.raises(SpecError) as err:
                validate(_spec(path), None, ())
            assert err.value.field == "path" and words in str(err.value), err.value
            assert time.monotonic() - started < 2
    finally:
        sock.close()


def test_file_swapped_for_a_symlink_after_validation_is_not_staged(tmp_path: Path) -> None:
    """#11.3: the producer validated a regular file; it is then swapped for a symlink to a
    mode-600 key. Staging opens the path once with O_NOFOLLOW and refuses it."""
    src = tmp_path / "report.txt"
    src.write_bytes(b"the real report")
    v = validate(_spec(src), None, ())
    src.unlink()
    src.symlink_to(_secret(tmp_path))  # the swap, between the check and the copy
    root = tmp_path / "staging"
    job_id = new_job_id()
    with pytest.raises(SpecError) as err:
        staging.stage_file(src, root, job_id, v.file_name)
    assert err.value.field == "path" and "symbolic link" in str(err.value)
    assert not (root / job_id).exists()


def test_worker_reads_the_file_it_opened_not_a_swapped_one(tmp_path: Path, open_source: OpenSource) -> None:
    """#11.3: after the worker opened a staged file, the file is swapped for a symlink to a key.
    Every later read (sequential, ranges, MD5, multipart body) comes from the descriptor opened
    beneath STAGING_DIR, so the key is never read."""
    root = tmp_path / "staging"
    job_id = new_job_id()
    staged = staging.stage_bytes(b"staged bytes " * 100, root, job_id, "a.txt")
    record = {"id": job_id, "source_kind": "file", "source": str(staged.path), "source_md5": staged.md5_b64}
    source = open_source(record, (), root)
    assert isinstance(source, FileSource)
    staged.path.unlink()
    staged.path.symlink_to(_secret(tmp_path))
    reader = source.open()
    assert reader.read(10_000) == b"staged bytes " * 100
    assert source.read_range(0, 6) == b"staged"
    body, _, _ = multipart_body(source, "a.txt", "text/plain")
    sent = body.read()
    assert b"staged bytes" in sent and SECRET not in sent
    assert source.current_md5() == staged.md5_b64
    source.close()
    # opened anew, the symlink is refused
    with pytest.raises(PermanentError) as err:
        open_source(record, (), root)
    assert err.value.code == "source-refused"


def test_worker_refuses_fifos_and_links_beneath_staging(tmp_path: Path, open_source: OpenSource) -> None:
    """#11.3: confinement is checked on what is opened: a FIFO, a symlinked folder, a hard link
    and a `..` path inside STAGING_DIR are refused (and the FIFO does not block)."""
    root = tmp_path / "staging"
    root.mkdir()
    os.mkfifo(root / "pipe")
    key = _secret(tmp_path)
    (root / "via").symlink_to(key.parent)
    os.link(key, root / "hard")
    for path in (root / "pipe", root / "via" / "id_key", root / "hard", root / ".." / "outside" / "id_key"):
        with pytest.raises(PermanentError) as err:
            open_source({"id": new_job_id(), "source_kind": "file", "source": str(path)}, (), root)
        assert err.value.code == "source-refused", path


def test_a_file_that_grows_while_copied_is_copied_to_the_size_seen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """#11.3: staging copies at most the size fstat gave at open; the job's size is that size."""
    src = tmp_path / "growing.log"
    first = os.urandom(64 * 1024)
    src.write_bytes(first)
    monkeypatch.setattr(staging, "COPY_CHUNK", 16 * 1024)

    class Growing:
        """Staging's hashlib: every chunk it hashes lets another writer append to the source."""

        @staticmethod
        def md5(*args: object, **kw: object) -> object:
            real = hashlib.md5(*args, **kw)  # type: ignore[arg-type]

            class Digest:
                def update(self, chunk: bytes) -> None:
                    if src.stat().st_size < 2_000_000:  # bounded: old code chased it to a full disk
                        with open(src, "ab") as f:
                            f.write(b"X" * 100_000)
                    real.update(chunk)

                def digest(self) -> bytes:
                    return real.digest()

            return Digest()

    monkeypatch.setattr(staging, "hashlib", Growing)
    staged = staging.stage_file(src, tmp_path / "staging", new_job_id(), "growing.log")
    assert staged.path.read_bytes() == first
    assert staged.md5_b64 == md5_b64(first)
    assert staged.size == len(first)


def test_a_hard_linked_file_inside_staging_is_copied_not_referenced(tmp_path: Path) -> None:
    """#11.3: the workers refuse hard-linked files beneath STAGING_DIR, so staging copies one
    (what it copies is what it opened) instead of referencing it in place."""
    root = tmp_path / "staging"
    root.mkdir()
    inner = root / "shared.bin"
    inner.write_bytes(b"twice linked")
    os.link(inner, tmp_path / "elsewhere.bin")
    staged = staging.stage_file(inner, root, new_job_id(), "shared.bin")
    assert staged.owned and staged.path != inner and staged.path.read_bytes() == b"twice linked"
    (tmp_path / "elsewhere.bin").unlink()
    again = staging.stage_file(inner, root, new_job_id(), "shared.bin")
    assert not again.owned and again.path == inner


# -- #11.5 job ids -------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["/abs", "../outside", "a" * 31, "A" * 32, "0" * 32 + "\n", ""])
def test_remove_job_dir_refuses_anything_but_a_job_id(tmp_path: Path, bad: str) -> None:
    """#11.5: `Path(root) / "/abs"` is `/abs`: only a well-formed id may name what is deleted."""
    root = tmp_path / "staging"
    root.mkdir()
    victim = tmp_path / "outside"
    victim.mkdir()
    (victim / "keep.txt").write_text("keep")
    target = str(victim) if bad == "/abs" else bad
    with pytest.raises(SpecError):
        staging.remove_job_dir(root, target)
    assert (victim / "keep.txt").exists()


def test_remove_job_dir_never_follows_a_planted_link(tmp_path: Path) -> None:
    """#11.5: a symlink planted under a job's name is removed, its target is not."""
    root = tmp_path / "staging"
    root.mkdir()
    victim = tmp_path / "outside"
    victim.mkdir()
    (victim / "keep.txt").write_text("keep")
    job_id = new_job_id()
    (root / job_id).symlink_to(victim)
    staging.remove_job_dir(root, job_id)
    assert not (root / job_id).is_symlink() and (victim / "keep.txt").exists()


def test_cli_refuses_malformed_job_ids(
    producer_env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """#11.5: ids on the command line are checked before they reach Redis or the disk."""
    assert cli_main(["status", "../../etc"]) == 2
    assert "job: malformed job id" in capsys.readouterr().err
    assert cli_main(["dead", "retry", "/tmp/x"]) == 2
    assert "job: malformed job id" in capsys.readouterr().err


def test_dead_letter_purge_ignores_a_crafted_id(
    producer_env: dict[str, str], staging_dir: Path, tmp_path: Path
) -> None:
    """#11.5: a crafted dead letter (`staged_owned=1`, id an absolute path) makes purge delete
    nothing outside STAGING_DIR."""
    from producers.client import Uploads
    from producers.dead_letters import DeadLetters
    from producers.keys import DEAD_KEY, job_key

    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("keep")
    crafted = str(victim)
    client = redis.Redis.from_url(producer_env["REDIS_URL"])
    client.hset(job_key(crafted), mapping={"id": crafted, "state": "failed", "staged_owned": "1"})
    client.zadd(DEAD_KEY, {crafted: 1.0})
    with Uploads.from_env() as up:
        dead = DeadLetters(up)
        assert dead.jobs() == []
        dead.purge(0)
    assert (victim / "keep.txt").exists()


# -- #11.10 staging permissions ------------------------------------------------------------------


def test_staged_copies_are_private_whatever_the_umask(tmp_path: Path) -> None:
    """#11.10: 0600 files and 0700 folders by default, even under umask 000; 0640/0770 in group
    mode; the block-MD5 sidecar too."""
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(3000))
    old = os.umask(0)
    try:
        root = tmp_path / "staging"
        for mode, file_mode, dir_mode in ((None, 0o600, 0o700), (GROUP, 0o640, 0o770)):
            job_id = new_job_id()
            kw = {} if mode is None else {"mode": mode}
            staged = staging.stage_file(src, root, job_id, "big.bin", 1000, 1024, **kw)  # type: ignore[arg-type]
            assert stat.S_IMODE(staged.path.stat().st_mode) == file_mode
            assert stat.S_IMODE((root / job_id).stat().st_mode) == dir_mode
            sidecar = root / f"{job_id}.block-md5"
            assert stat.S_IMODE(sidecar.stat().st_mode) == file_mode
            b = staging.stage_bytes(b"x", root, new_job_id(), "b.txt", **kw)  # type: ignore[arg-type]
            assert stat.S_IMODE(b.path.stat().st_mode) == file_mode
            assert stat.S_IMODE(b.path.parent.stat().st_mode) == dir_mode
    finally:
        os.umask(old)


def test_staging_mode_setting(monkeypatch: pytest.MonkeyPatch, producer_env: dict[str, str]) -> None:
    """#11.10: AWORK_STAGING_MODE is read once with the shared settings; bad values name it."""
    assert SharedSettings.from_env().staging_mode.file_mode == 0o600
    monkeypatch.setenv("AWORK_STAGING_MODE", "group")
    assert SharedSettings.from_env().staging_mode == GROUP
    monkeypatch.setenv("AWORK_STAGING_MODE", "world")
    with pytest.raises(ConfigError, match="AWORK_STAGING_MODE"):
        SharedSettings.from_env()


# -- #11.7 the multipart route checks the staged MD5 ---------------------------------------------


def test_multipart_stream_stops_before_its_last_byte_on_a_changed_file(tmp_path: Path) -> None:
    """#11.7: the read that would hand over the last bytes raises instead."""
    data = os.urandom(5000)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    src = FileSource(path, md5_b64=md5_b64(b"what was staged"))
    body, _, length = multipart_body(src, "f.bin", "x/y")
    got = b""
    with pytest.raises(PermanentError) as err:
        while chunk := body.read(1000):
            got += chunk
    assert err.value.code == "source-changed"
    assert len(got) < length and data[-1000:] not in got
    src.close()
    reads = verified_reads(FileSource(path).open(), len(data), md5_b64(data), "f")
    assert reads(10_000) == data  # an unchanged file goes through whole


# -- end to end --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    f = Fleet(tmp_path_factory.mktemp("hostile"), worker_count=1, concurrency=2).start()
    yield f
    f.stop()


def _control(fleet: Fleet) -> Celery:
    app = Celery("hostile-control", set_as_current=False)
    app.conf.update(celery_config(fleet.env["REDIS_URL"]))
    return app


@pytest.mark.slow
def test_multipart_job_with_a_file_changed_after_staging_fails(fleet: Fleet, tmp_path: Path) -> None:
    """#11.7: a company target (one multipart request): the staged copy is changed (same size)
    after staging, the job fails `source-changed` and the sandbox holds no file for it."""
    company = fleet.entity("companies")
    src = tmp_path / "contract.pdf"
    src.write_bytes(os.urandom(200_000))
    app = _control(fleet)
    try:
        # hold the transfer queue so the change lands deterministically before the worker reads
        app.control.cancel_consumer("awork.transfer", reply=True, timeout=5)
        job = fleet.uploads.enqueue(src, to=f"company:{company}")
        staged = Path(fleet.record(job.id)["source"])
        tampered = bytearray(staged.read_bytes())
        tampered[-1] ^= 0xFF
        staged.write_bytes(bytes(tampered))
    finally:
        app.control.add_consumer("awork.transfer", reply=True, timeout=5)
        app.close()
    (final,) = fleet.wait([job], timeout=60)
    assert final.state.value == "failed", final
    assert final.error is not None and final.error.code == "source-changed"
    assert fleet.files_of(company) == []


@pytest.mark.slow
def test_crafted_record_with_a_path_as_id_deletes_nothing(fleet: Fleet, tmp_path: Path) -> None:
    """#11.5: a record written into Redis with id `/abs/path` and `staged_owned=1`, and its
    canvas, must not make a worker rmtree that path: the task is dropped at its first step."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("keep")
    staged = Path(fleet.env["STAGING_DIR"]) / "planted.txt"
    staged.write_text("hello")
    crafted = str(victim)
    fleet.plant_job(id=crafted, source=str(staged), staged_owned="1")

    def dropped() -> bool:
        logs = "".join(p.read_text(errors="replace") for p in (fleet.root / "logs").glob("*.log"))
        return "malformed-job-id" in logs and crafted[:40] in logs

    def ended() -> bool:
        return fleet.record(crafted).get("state") in ("done", "failed", "dead")

    wait_until(lambda: dropped() or ended(), 30, "the worker dropping (or running) the crafted job")
    time.sleep(1)
    assert (victim / "keep.txt").exists()
    assert dropped() and fleet.record(crafted).get("state") == "queued"


@pytest.mark.slow
def test_opening_beneath_staging_is_what_the_fleet_uses(fleet: Fleet) -> None:
    """#11.3: a staged file a job references is read through `open_beneath` (no symlinks)."""
    root = Path(fleet.env["STAGING_DIR"])
    inner = root / "ok.txt"
    inner.write_text("ok")
    with open_beneath(root, inner) as opened:
        assert opened.pread(0, 10) == b"ok"
    (root / "alias.txt").symlink_to(inner)
    entity = fleet.entity("tasks")
    job = fleet.uploads.enqueue(inner, to=f"task:{entity}")
    (final,) = fleet.wait([job], timeout=60)
    assert final.state.value == "done"
    with pytest.raises(SpecError):
        fleet.uploads.enqueue(root / "alias.txt", to=f"task:{entity}")


@pytest.mark.slow
def test_crafted_record_with_a_spoofing_name_is_not_sent(fleet: Fleet) -> None:
    """#11.6: a record written straight into Redis with a right-to-left override in its file
    name fails `record-invalid` at the worker; awork never sees the name."""
    entity = fleet.entity("tasks")
    job = fleet.uploads.enqueue(b"harmless", to=f"task:{entity}", name="placeholder.txt")
    fleet.wait([job], timeout=60)
    staged = Path(fleet.env["STAGING_DIR"]) / "spoof.txt"
    staged.write_text("hello")
    job_id = new_job_id()
    fleet.plant_job(id=job_id, target=f"task:{entity}", file_name="invoice\u202efdp.exe", source=str(staged))
    (final,) = fleet.uploads.wait_many([job_id], timeout=60)
    assert final.state.value == "failed" and final.error is not None
    assert final.error.code == "record-invalid" and "file_name" in (final.error.description or "")
    assert [f["file_name"] for f in fleet.files_of(entity)] == ["placeholder.txt"]
