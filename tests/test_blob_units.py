"""Small pieces of the transfer engine: URL checks, error classification, journals, policy."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import threading
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import requests
from requests.adapters import HTTPAdapter

from producers.block_digests import MAX_BLOCKS
from workers.blob import BlobUploader, TransferPolicy, block_id, check_upload_url, upload_identity, url_expiry
from workers.blob.errors import Aborted, BlocksLost, BlocksRefused, error_from
from workers.blob.transport import Put, Transport
from workers.block_journal import BlockJournal, MemoryBlockJournal, RedisBlockJournal
from workers.errors import AworkError, PermanentError, TransientError, UploadUrlExpired
from workers.sources import FileSource, file_md5_b64, md5_b64


@pytest.mark.parametrize(
    ("url", "allowed", "ok"),
    [
        ("https://acc.blob.core.windows.net/c/b?sig=x", ["acc.blob.core.windows.net"], True),
        ("https://ACC.blob.core.windows.net:443/c/b", ["acc.blob.core.WINDOWS.net"], True),
        ("https://acc.blob.core.windows.net/c/b", ["acc.blob.core.windows.net:443"], True),
        ("https://acc.blob.core.windows.net:8443/c/b", ["acc.blob.core.windows.net"], False),
        ("http://127.0.0.1:10000/a/c/b", ["127.0.0.1:10000"], True),
        ("http://127.0.0.1:10001/a/c/b", ["127.0.0.1:10000"], False),
        ("http://127.0.0.1/a", ["127.0.0.1"], True),
        ("https://evil.example/c/b", ["acc.blob.core.windows.net"], False),
        ("https://acc.blob.core.windows.net.evil.example/c", ["acc.blob.core.windows.net"], False),
        ("https://user:pw@acc.blob.core.windows.net/c/b", ["acc.blob.core.windows.net"], False),
        ("ftp://acc.blob.core.windows.net/c/b", ["acc.blob.core.windows.net"], False),
        ("http://[::1]:9000/c/b", ["[::1]:9000"], True),
    ],
)
def test_upload_host_allow_list(url: str, allowed: list[str], ok: bool) -> None:
    if ok:
        check_upload_url(url, allowed)
    else:
        with pytest.raises(PermanentError):
            check_upload_url(url, allowed)


def test_url_expiry() -> None:
    assert url_expiry("https://h/c/b?se=2026-01-02T03:04:05Z&sig=x") == dt.datetime(
        2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC
    )
    assert url_expiry("https://h/c/b?se=2026-01-02&sig=x") == dt.datetime(2026, 1, 2, tzinfo=dt.UTC)
    assert url_expiry("https://h/c/b?se=2026-01-02T03%3A04%3A05Z") is not None
    assert url_expiry("https://h/c/b?sig=x") is None
    assert url_expiry("https://h/c/b?se=garbage") is None


def test_expired_url_is_refused_before_anything_is_sent(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x")
    up = BlobUploader(["h.example"], session_factory=lambda: pytest.fail("no session may be made"))
    with pytest.raises(UploadUrlExpired):
        up.upload(
            "https://h.example/c/b?se=2020-01-01T00:00:00Z&sig=x",
            FileSource(tmp_path / "f"),
            content_type="x/y",
        )


def test_block_ids_have_one_length_and_identity_ignores_the_signature() -> None:
    ids = {len(block_id(i)) for i in (0, 9, 10, 12345, MAX_BLOCKS - 1)}
    assert len(ids) == 1
    assert base64.b64decode(block_id(7)) == b"00000007"
    a = upload_identity("https://h/c/b.bin?se=1&sig=aaa")
    assert a == upload_identity("https://H/c/b.bin?se=2&sig=bbb")
    assert a != upload_identity("https://h/c/other.bin?se=1&sig=aaa")
    assert "sig" not in a and len(a) == 32


def _resp(status: int, code: str | None = None, header: bool = True) -> requests.Response:
    r = requests.Response()
    r.status_code = status
    r.headers["x-ms-request-id"] = "req-1"
    if code and header:
        r.headers["x-ms-error-code"] = code
    r._content = (f"<?xml version='1.0'?><Error><Code>{code}</Code></Error>" if code else "").encode()
    return r


@pytest.mark.parametrize(
    ("status", "code", "op", "kind"),
    [
        (403, "AuthenticationFailed", "put-block", UploadUrlExpired),
        (403, "AuthorizationFailure", "put-blob", UploadUrlExpired),
        (403, "AuthorizationPermissionMismatch", "put-block", BlocksRefused),
        (403, "AuthorizationPermissionMismatch", "put-blob", PermanentError),
        (400, "InvalidQueryParameterValue", "put-block", BlocksRefused),
        (400, "UnsupportedHeader", "put-block-list", BlocksRefused),
        (405, None, "put-block", BlocksRefused),
        (501, None, "put-block", BlocksRefused),
        (400, "Md5Mismatch", "put-block", TransientError),
        (400, "InvalidBlockList", "put-block-list", BlocksLost),
        (503, "ServerBusy", "put-block", TransientError),
        (500, "OperationTimedOut", "put-blob", TransientError),
        (404, "ContainerNotFound", "put-blob", PermanentError),
        (413, "RequestBodyTooLarge", "put-blob", PermanentError),
    ],
)
def test_error_classification(status: int, code: str | None, op: str, kind: type) -> None:
    for header in (True, False):  # the code from x-ms-error-code or from the XML body
        err = error_from(_resp(status, code, header), op)
        assert type(err) is kind
        assert (err.status, err.code, err.trace_id) == (status, code, "req-1")


def _journals() -> list[BlockJournal]:
    return [
        MemoryBlockJournal(),
        RedisBlockJournal(fakeredis.FakeRedis(), "j1"),
        RedisBlockJournal(fakeredis.FakeRedis(decode_responses=True), "j2"),
    ]


@pytest.mark.parametrize("journal", _journals(), ids=["memory", "redis-bytes", "redis-str"])
def test_journal_binds_to_one_upload(journal: BlockJournal) -> None:
    journal.begin("blob-a:8")
    journal.ack(block_id(0), "m0")
    journal.ack(block_id(1), "m1")
    journal.begin("blob-a:8")  # the same upload again: keep
    assert journal.acked() == {block_id(0): "m0", block_id(1): "m1"}
    journal.begin("blob-b:8")  # another blob: drop
    assert journal.acked() == {}
    journal.ack(block_id(0), "n0")
    journal.reset()
    assert journal.acked() == {}


def test_redis_journal_key_and_expiry() -> None:
    client = fakeredis.FakeRedis()
    journal = RedisBlockJournal(client, "abc", ttl=3600)
    journal.begin("k")
    journal.ack(block_id(3), "m")
    assert journal.key == "awork:job:abc:blocks"
    assert 3500 < client.ttl("awork:job:abc:blocks") <= 3600
    assert set(client.hkeys("awork:job:abc:blocks")) == {b"_upload", block_id(3).encode()}


def test_policy_validation() -> None:
    with pytest.raises(ValueError):
        TransferPolicy(block_size=0)
    with pytest.raises(ValueError):
        TransferPolicy(parallel_blocks=0)
    with pytest.raises(ValueError):
        TransferPolicy(single_put_threshold=6000 * 1024 * 1024)
    assert TransferPolicy().timeout == (10.0, 120.0)


def test_file_md5_streams(tmp_path: Path) -> None:
    data = bytes(range(256)) * 40000
    (tmp_path / "f").write_bytes(data)
    expected = base64.b64encode(hashlib.md5(data).digest()).decode()
    assert file_md5_b64(tmp_path / "f", chunk=4096) == expected == md5_b64(data)
    src = FileSource(tmp_path / "f")
    assert src.read_range(256, 10) == bytes(range(10))
    assert src.md5_b64() == expected


class _Answers(HTTPAdapter):
    """Answers PUTs from a list of statuses, on no network at all; counts what it was sent."""

    def __init__(self, statuses: list[int]) -> None:
        super().__init__()
        self.statuses = statuses
        self.sent = 0

    def send(self, request: requests.PreparedRequest, *args: object, **kwargs: object) -> requests.Response:
        resp = requests.Response()
        resp.status_code = self.statuses[min(self.sent, len(self.statuses) - 1)]
        resp._content = b""
        resp.request = request
        self.sent += 1
        return resp


def _transport(statuses: list[int], retries: int = 2) -> tuple[Transport, _Answers]:
    adapter = _Answers(statuses)

    def session() -> requests.Session:
        s = requests.Session()
        s.mount("http://", adapter)
        return s

    policy = TransferPolicy(block_retries=retries, retry_backoff=0.001, retry_backoff_max=0.001)
    return Transport(policy, session), adapter


def _put(**hooks: Any) -> Put:
    url = "http://127.0.0.1:9/c/b?sig=x"
    return Put(
        op="put-block", label="put-block x", url=url, request_url=url, headers={}, body=lambda: b"", **hooks
    )


def test_one_retry_loop_retries_transient_answers_then_gives_up() -> None:
    t, host = _transport([503, 503, 503, 503], retries=2)
    failures: list[int | None] = []
    retries: list[int] = []
    with pytest.raises(TransientError):
        t.put(
            _put(on_failure=lambda err, body: failures.append(err.status), on_retry=lambda: retries.append(1))
        )
    assert host.sent == 3 and failures == [503, 503, 503] and len(retries) == 2


def test_one_retry_loop_returns_the_accepted_answer_after_a_retry() -> None:
    t, host = _transport([500, 201])
    assert t.put(_put(ok=(201,))).status_code == 201 and host.sent == 2


def test_one_retry_loop_stops_at_a_permanent_answer_and_lets_hooks_replace_it() -> None:
    t, host = _transport([404, 201])
    with pytest.raises(PermanentError):
        t.put(_put())
    assert host.sent == 1

    def verify(resp: requests.Response) -> AworkError | None:
        return TransientError("server MD5 differs", code="Md5Mismatch")

    def refuse(err: AworkError, body: object) -> None:
        raise PermanentError("the file changed", code="source-changed")

    t, host = _transport([201])
    with pytest.raises(PermanentError) as info:
        t.put(_put(verify=verify, on_failure=refuse))
    assert info.value.code == "source-changed" and host.sent == 1


def test_one_retry_loop_sends_nothing_once_aborted() -> None:
    t, host = _transport([201])
    abort = threading.Event()
    abort.set()
    with pytest.raises(Aborted):
        t.put(_put(abort=abort))
    assert host.sent == 0
