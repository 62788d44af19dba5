"""Recurring files without a fleet: field checks, the public-source check, the name lock."""

from __future__ import annotations

import uuid
from pathlib import Path

import fakeredis
import pytest

from producers.contract import SpecError
from producers.keys import job_key, name_lock_key
from producers.public_source import SourceNotPublic, address_public, check_public_url, public_source_size
from producers.spec import JobSpec, validate
from tests.file_server import file_server
from workers.name_lock import NameLocks

# fixed, not random: it appears in test ids, which pytest-xdist needs equal in every process
ID = str(uuid.uuid5(uuid.NAMESPACE_URL, __name__))


def _v(spec: JobSpec) -> object:
    return validate(spec, {"default"}, ())


@pytest.mark.parametrize(
    ("kwargs", "to", "pattern"),
    [
        ({"on_existing": "replace"}, f"task:{ID}", r"^on_existing: expected one of new, version, skip"),
        ({"via": "email"}, f"task:{ID}", r"^via: expected one of workers, awork"),
        ({"new_version_of": "42"}, f"task:{ID}", r"^new_version_of: malformed file id '42'"),
        ({"new_version_of": ID, "on_existing": "skip"}, f"task:{ID}", r"^new_version_of: names the file"),
        ({"on_existing": "version"}, f"company:{ID}", r"^on_existing: awork has no file list for companies"),
        ({"on_existing": "version"}, f"image:projects/{ID}", r"^on_existing: profile images"),
        ({"via": "awork"}, f"task:{ID}", r"^via: awork fetches http\(s\) URLs only"),
    ],
)
def test_bad_fields_are_named(tmp_path: Path, kwargs: dict[str, str], to: str, pattern: str) -> None:
    f = tmp_path / "a.txt"
    f.write_text("x")
    with pytest.raises(SpecError, match=pattern):
        _v(JobSpec(f, to, **kwargs))  # type: ignore[arg-type]


def test_url_field_combinations() -> None:
    with pytest.raises(SpecError, match=r"^on_existing: skip compares name and size"):
        validate(JobSpec("https://files.example/a.csv", f"task:{ID}", on_existing="skip"), None,
                 ("files.example",))
    with pytest.raises(SpecError, match=r"^on_existing: awork adds versions from uploaded bytes only"):
        _v(JobSpec("https://files.example/a.csv", f"task:{ID}", on_existing="version", via="awork"))
    ok = _v(JobSpec("https://files.example/a.csv", f"task:{ID}", on_existing="skip", via="awork"))
    # via awork: the workers' allow-list does not apply (they never fetch it)
    assert ok.placement.flow == "resolve" and ok.url  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("address", "public"),
    [("8.8.8.8", True), ("2606:4700::1111", True), ("127.0.0.1", False), ("10.0.0.1", False),
     ("192.168.1.1", False), ("172.16.0.1", False), ("100.64.0.1", False), ("169.254.169.254", False),
     ("::1", False), ("fd00::1", False), ("fe80::1", False), ("::ffff:10.0.0.1", False), ("0.0.0.0", False)],
)
def test_public_addresses(address: str, public: bool) -> None:
    assert address_public(address, allow_loopback=False) is public


def test_a_host_with_one_private_address_is_not_public() -> None:
    refused = r"host files.example:443 is not public \(resolves to 10.0.0.7\)"
    with pytest.raises(SourceNotPublic, match=refused):
        check_public_url("https://files.example/x", False, resolver=lambda h, p: ["8.8.8.8", "10.0.0.7"])
    check_public_url("https://files.example/x", False, resolver=lambda h, p: ["8.8.8.8"])
    with pytest.raises(SourceNotPublic, match="credentials"):
        check_public_url("https://u:p@files.example/x", False, resolver=lambda h, p: ["8.8.8.8"])


def test_head_size_cap_and_missing_length() -> None:
    with file_server() as files:
        files.bodies["ok.bin"] = b"x" * 10
        files.head_sizes["huge.bin"] = 100_000_001
        assert public_source_size(files.url("ok.bin"), allow_loopback=True) == 10
        with pytest.raises(SourceNotPublic, match="over awork's 100000000-byte cap"):
            public_source_size(files.url("huge.bin"), allow_loopback=True)
        with pytest.raises(SourceNotPublic, match="HEAD answered 404"):
            public_source_size(files.url("missing"), allow_loopback=True)
        with pytest.raises(SourceNotPublic, match="is not public"):
            public_source_size(files.url("ok.bin"), allow_loopback=False)


def test_name_lock_waits_for_a_running_owner_and_takes_over_an_ended_one() -> None:
    r = fakeredis.FakeRedis()
    locks = NameLocks(r)
    key = name_lock_key("default", f"task:{ID}", "report.pdf")
    r.hset(job_key("job-a"), "state", "uploading")
    assert locks.acquire(key, "job-a") is None
    assert locks.acquire(key, "job-a") is None  # its own again
    assert locks.acquire(key, "job-b") == "job-a"
    r.hset(job_key("job-a"), "state", "done")
    assert locks.acquire(key, "job-b") is None  # the owner ended: the name is free
    locks.release(key, "job-a")  # not the owner any more: no effect
    assert locks.acquire(key, "job-c") is None  # job-b's record does not exist: taken over
    assert r.get(key) == b"job-c"
    locks.release(key, "job-c")
    assert r.get(key) is None


def test_redrive_starts_a_recurring_flow_at_its_step() -> None:
    from producers.dead_letters import _retry_step
    from producers.redrive import resume_step

    base = {"route": "byuploadid", "upload_id": "u1", "uploaded_upload_id": "u1"}
    assert resume_step({**base, "flow": "resolve"}) == "resolve"
    assert resume_step({**base, "flow": "version"}) == "version"
    assert resume_step({**base, "route": "multipart", "flow": "version"}) == "version"
    assert _retry_step({"route": "multipart", "flow": "byurl"}) == "byurl"
    assert resume_step({**base, "flow": ""}) == "link"  # resolved to the default canvas
