"""Target parsing and spec validation: every bad field gets an error that names it."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from ops.demo_files import png_bytes
from producers.config import redact_url
from producers.contract import MULTIPART_MAX_BYTES, Route, SpecError, Target
from producers.spec import JobSpec, sniff_image, validate

# fixed, not random: it appears in test ids, which pytest-xdist needs equal in every process
ID = str(uuid.uuid5(uuid.NAMESPACE_URL, __name__))


@pytest.mark.parametrize(
    ("text", "route", "link_path"),
    [
        (f"task:{ID}", Route.BY_UPLOAD_ID, f"/tasks/{ID}/files/byuploadid"),
        (f"project:{ID}", Route.BY_UPLOAD_ID, f"/projects/{ID}/files/byuploadid"),
        (f"document:{ID}", Route.BY_UPLOAD_ID, f"/documents/{ID}/files/byuploadid"),
        (f"tasktemplate:{ID}", Route.BY_UPLOAD_ID, f"/tasktemplates/{ID}/files/byuploadid"),
        (f"image:projects/{ID}", Route.IMAGE_BY_UPLOAD_ID, f"/files/images/projects/{ID}/byuploadid"),
        (f"image:Users/{ID}", Route.IMAGE_BY_UPLOAD_ID, f"/files/images/users/{ID}/byuploadid"),
        (f"company:{ID}", Route.MULTIPART, f"/companies/{ID}/files"),
        (f"user:{ID}", Route.MULTIPART, f"/users/{ID}/files"),
        (f"workspace:{ID}", Route.MULTIPART, f"/workspaces/{ID}/files"),
        (f"projecttemplate:{ID}", Route.MULTIPART, f"/projecttemplates/{ID}/files"),
    ],
)
def test_every_target_kind_parses(text: str, route: Route, link_path: str) -> None:
    target = Target.parse(text)
    assert target.route is route
    assert target.link_path == link_path
    assert Target.parse(str(target)) == target


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (f"comment:{ID}", "unknown target kind 'comment'"),
        ("task:123", "malformed id '123'"),
        (ID, "expected KIND:ID"),
        (f"image:tasks/{ID}", "unknown image entity 'tasks'"),
        (f"image:{ID}", "image targets are image:<entityName>/<id>"),
    ],
)
def test_bad_targets_name_the_field(text: str, fragment: str) -> None:
    with pytest.raises(SpecError) as info:
        Target.parse(text)
    assert info.value.field == "to"
    assert fragment in str(info.value)
    assert str(info.value).startswith("to: ")


def _validate(spec: JobSpec, hosts: tuple[str, ...] = ()) -> object:
    return validate(spec, {"default", "acme"}, hosts)


def test_missing_empty_directory_and_unreadable(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"^path: .*no such file"):
        _validate(JobSpec(tmp_path / "nope.pdf", f"task:{ID}"))
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(SpecError, match=r"^path: .*is empty"):
        _validate(JobSpec(empty, f"task:{ID}"))
    with pytest.raises(SpecError, match=r"^path: .*is a directory"):
        _validate(JobSpec(tmp_path, f"task:{ID}"))


def test_image_target_needs_an_image(tmp_path: Path) -> None:
    text = tmp_path / "notes.png"
    text.write_bytes(b"just text, not a picture")
    with pytest.raises(SpecError, match=r"^path: notes.png: not an image"):
        _validate(JobSpec(text, f"image:projects/{ID}"))
    png = tmp_path / "logo.bin"
    png.write_bytes(png_bytes())
    valid = _validate(JobSpec(png, f"image:projects/{ID}"))
    assert valid.content_type == "image/png"  # type: ignore[attr-defined]


def test_multipart_cap(tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    with big.open("wb") as fh:  # sparse: no disk used
        fh.truncate(MULTIPART_MAX_BYTES + 1)
    with pytest.raises(SpecError, match=r"^path: .*over the 1000000000 byte cap of the multipart route"):
        _validate(JobSpec(big, f"company:{ID}"))


def test_workspace_name_and_other_fields(tmp_path: Path) -> None:
    f = tmp_path / "a.txt"
    f.write_text("hello")
    with pytest.raises(SpecError, match=r"^workspace: unknown workspace 'nope' \(known: acme, default\)"):
        _validate(JobSpec(f, f"task:{ID}", workspace="nope"))
    with pytest.raises(SpecError, match=r"^idempotency_key: "):
        _validate(JobSpec(f, f"task:{ID}", idempotency_key="has space"))
    with pytest.raises(SpecError, match=r"^content_type: malformed MIME type"):
        _validate(JobSpec(f, f"task:{ID}", content_type="pdf"))
    with pytest.raises(SpecError, match=r"^name: .*path separator"):
        _validate(JobSpec(f, f"task:{ID}", name="../etc/passwd"))
    with pytest.raises(SpecError, match=r"^name: required when the source is raw bytes"):
        _validate(JobSpec(b"abc", f"task:{ID}"))
    ok = _validate(JobSpec(f, f"task:{ID}", name="Report.pdf"))
    assert ok.content_type == "application/pdf"  # type: ignore[attr-defined]


def test_url_sources_need_the_allow_list() -> None:
    with pytest.raises(SpecError, match=r"^source: host 10.0.0.5:80 is not on the allow-list"):
        _validate(JobSpec("http://10.0.0.5/x.pdf", f"task:{ID}"))
    with pytest.raises(SpecError, match=r"^source: URLs with credentials"):
        _validate(JobSpec("https://u:p@files.example/x.pdf", f"task:{ID}"), ("files.example",))
    ok = _validate(JobSpec("https://files.example/a%20b.pdf", f"task:{ID}"), ("files.example",))
    assert ok.file_name == "a b.pdf"  # type: ignore[attr-defined]


def test_sniff_image() -> None:
    assert sniff_image(png_bytes()) == "image/png"
    assert sniff_image(b"\xff\xd8\xff\xe0xxxx") == "image/jpeg"
    assert sniff_image(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "image/webp"
    assert sniff_image(b"%PDF-1.7") is None


def test_redact_url() -> None:
    assert redact_url("redis://:s3cret@127.0.0.1:6380/0") == "redis://:***@127.0.0.1:6380/0"
    assert redact_url("rediss://user:s3cret@host/1") == "rediss://user:***@host/1"
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
