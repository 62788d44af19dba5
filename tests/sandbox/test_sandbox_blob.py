"""The blob host: Put Blob, blocks, MD5 checks, SAS expiry and tampering, Azure XML errors."""

from __future__ import annotations

import base64
import hashlib
import time
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import requests

from .conftest import Api, azure_code, md5_b64


def _with_query(url: str, **changes: str) -> str:
    parts = urlsplit(url)
    q = dict(parse_qsl(parts.query))
    q.update(changes)
    return urlunsplit(parts._replace(query=urlencode(q, quote_via=quote)))


def _bid(n: int, width: int = 6) -> str:
    return base64.b64encode(f"{n:0{width}d}".encode()).decode()


def _block_url(url: str, block_id: str) -> str:
    return f"{url}&comp=block&blockid={quote(block_id, safe='')}"


def _block_list(ids: list[tuple[str, str]]) -> bytes:
    inner = "".join(f"<{kind}>{bid}</{kind}>" for kind, bid in ids)
    return f'<?xml version="1.0" encoding="utf-8"?><BlockList>{inner}</BlockList>'.encode()


def test_put_blob(api: Api) -> None:
    g = api.generate()
    data = b"blob bytes" * 500
    r = api.put(g["uploadURL"], data, {"Content-MD5": md5_b64(data)})
    assert r.status_code == 201, r.text
    assert r.headers["ETag"] and r.headers["Last-Modified"] and r.headers["x-ms-request-id"]
    assert r.headers["Content-MD5"] == md5_b64(data)
    up = api.sb.stats()["uploads"][g["uploadId"]]
    assert up["committed"] and up["size"] == len(data)
    assert up["md5"] == hashlib.md5(data).hexdigest()
    # Put Blob again overwrites
    r = api.put(g["uploadURL"], b"second")
    assert r.status_code == 201
    assert api.sb.stats()["uploads"][g["uploadId"]]["size"] == 6


def test_put_blob_requires_blob_type(api: Api) -> None:
    g = api.generate()
    r = api.http.put(g["uploadURL"], data=b"abc")
    assert r.status_code == 400 and azure_code(r) == "MissingRequiredHeader"
    assert b"<HeaderName>x-ms-blob-type</HeaderName>" in r.content
    r = api.put(g["uploadURL"], b"abc", {"x-ms-blob-type": "PageBlob"})
    assert r.status_code == 400 and azure_code(r) == "InvalidHeaderValue"
    assert not api.sb.stats()["uploads"][g["uploadId"]]["committed"]


def test_md5_mismatch(api: Api) -> None:
    g = api.generate()
    wrong = md5_b64(b"something else")
    r = api.put(g["uploadURL"], b"abc", {"Content-MD5": wrong})
    assert r.status_code == 400 and azure_code(r) == "Md5Mismatch"
    r = api.put(g["uploadURL"], b"abc", {"x-ms-blob-content-md5": wrong})
    assert r.status_code == 400 and azure_code(r) == "Md5Mismatch"
    r = api.put(g["uploadURL"], b"abc", {"Content-MD5": "not base64!"})
    assert r.status_code == 400 and azure_code(r) == "InvalidMd5"
    assert not api.sb.stats()["uploads"][g["uploadId"]]["committed"]
    task = api.sb.seed("tasks")
    assert api.link("tasks", task, g["uploadId"]).status_code == 400


def test_expired_url_is_refused(api: Api) -> None:
    api.sb.set_faults({"upload_url_lifetime_s": 1})
    g = api.generate()
    time.sleep(2.2)
    r = api.put(g["uploadURL"], b"late")
    assert r.status_code == 403 and azure_code(r) == "AuthenticationFailed"
    assert b"Signed expiry time" in r.content


def test_tampered_url_is_refused(api: Api) -> None:
    g = api.generate()
    url = g["uploadURL"]
    later = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 86400 * 365))
    tampered = [
        _with_query(url, se=later),
        _with_query(url, sp="rcwd"),
        _with_query(url, sig=base64.b64encode(b"x" * 32).decode()),
        url.replace(g["uploadId"], "0" * 32),
        url.split("&sig=")[0],
        _with_query(url, extra="1"),
    ]
    for t in tampered:
        r = api.put(t, b"x")
        assert r.status_code == 403, t
        assert azure_code(r) == "AuthenticationFailed"
    assert api.put(url, b"x").status_code == 201


def test_authorization_header_is_refused_and_counted(api: Api) -> None:
    g = api.generate()
    r = api.put(g["uploadURL"], b"x", {"Authorization": "Bearer key-a"})
    assert r.status_code == 403 and azure_code(r) == "AuthenticationFailed"
    assert api.sb.stats()["blob_authorization_headers"] == 1


def test_single_put_size_cap(api: Api) -> None:
    api.sb.set_faults({"put_blob_max_bytes": 1000})
    g = api.generate()
    r = api.put(g["uploadURL"], b"x" * 1001)
    assert r.status_code == 413 and azure_code(r) == "RequestBodyTooLarge"
    assert api.put(g["uploadURL"], b"x" * 1000).status_code == 201


def test_content_length_is_required(api: Api) -> None:
    g = api.generate()
    r = api.put(g["uploadURL"], iter([b"chunked", b"body"]))  # type: ignore[arg-type]
    assert r.status_code == 411 and azure_code(r) == "MissingContentLengthHeader"


def test_block_upload_round_trip(api: Api) -> None:
    api.sb.set_faults({"upload_url_permissions": "rcw"})
    g = api.generate()
    url = g["uploadURL"]
    assert "sp=rcw" in url
    parts = [bytes([65 + i]) * (1000 + i) for i in range(4)]
    for i, part in enumerate(parts):
        r = api.http.put(_block_url(url, _bid(i)), data=part,
                         headers={"Content-MD5": md5_b64(part)})
        assert r.status_code == 201, r.text
        assert r.headers["Content-MD5"] == md5_b64(part)
    # retry of block 1 replaces it
    assert api.http.put(_block_url(url, _bid(1)), data=parts[1]).status_code == 201
    r = api.http.get(url + "&comp=blocklist&blocklisttype=all")
    assert r.status_code == 200
    assert r.text.count("<Block>") == 4 and "<UncommittedBlocks>" in r.text
    # an unrelated MD5 on the list is stored, not checked
    claimed = md5_b64(b"whatever the client says")
    r = api.http.put(url + "&comp=blocklist",
                     data=_block_list([("Latest", _bid(i)) for i in range(3)]),
                     headers={"x-ms-blob-content-type": "text/plain",
                              "x-ms-blob-content-md5": claimed})
    assert r.status_code == 201, r.text
    r = api.http.get(url + "&comp=blocklist")
    assert r.text.count("<Block>") == 3 and "<CommittedBlocks>" in r.text
    # append block 3 while keeping the committed ones
    assert api.http.put(_block_url(url, _bid(3)), data=parts[3]).status_code == 201
    body = _block_list([("Committed", _bid(0)), ("Committed", _bid(1)), ("Committed", _bid(2)),
                        ("Uncommitted", _bid(3))])
    r = api.http.put(url + "&comp=blocklist", data=body, headers={"Content-MD5": md5_b64(body)})
    assert r.status_code == 201, r.text
    whole = b"".join(parts)
    up = api.sb.stats()["uploads"][g["uploadId"]]
    assert up["size"] == len(whole) and up["md5"] == hashlib.md5(whole).hexdigest()
    assert up["content_md5"] is None and up["committed_blocks"] == 4
    assert api.sb.stats()["blocks"][g["uploadId"]] == {_bid(0): 1, _bid(1): 2, _bid(2): 1,
                                                       _bid(3): 2}
    task = api.sb.seed("tasks")
    info = api.link("tasks", task, g["uploadId"], "joined.bin").json()
    assert api.request("GET", f"/files/{info['id']}/download").content == whole
    f = api.sb.stats()["files"][0]
    assert f["md5"] == hashlib.md5(whole).hexdigest()


def test_block_list_md5_property_is_kept_not_validated(api: Api) -> None:
    g = api.generate()
    url = g["uploadURL"]
    assert api.http.put(_block_url(url, _bid(0)), data=b"abc").status_code == 201
    claimed = md5_b64(b"not abc")
    r = api.http.put(url + "&comp=blocklist", data=_block_list([("Latest", _bid(0))]),
                     headers={"x-ms-blob-content-md5": claimed})
    assert r.status_code == 201
    task = api.sb.seed("tasks")
    assert api.link("tasks", task, g["uploadId"]).status_code == 200
    f = api.sb.stats()["files"][0]
    assert f["content_md5"] == claimed and f["md5"] == hashlib.md5(b"abc").hexdigest()


def test_block_id_rules(api: Api) -> None:
    g = api.generate()
    url = g["uploadURL"]
    assert api.http.put(_block_url(url, _bid(0, 6)), data=b"a").status_code == 201
    r = api.http.put(_block_url(url, _bid(1, 8)), data=b"b")  # another length
    assert r.status_code == 400 and azure_code(r) == "InvalidBlobOrBlock"
    r = api.http.put(_block_url(url, "not*base64"), data=b"b")
    assert r.status_code == 400 and azure_code(r) == "InvalidQueryParameterValue"
    long_id = base64.b64encode(b"x" * 65).decode()
    r = api.http.put(_block_url(url, long_id), data=b"b")
    assert r.status_code == 400 and azure_code(r) == "InvalidQueryParameterValue"
    r = api.http.put(url + "&comp=block", data=b"b")
    assert r.status_code == 400 and azure_code(r) == "MissingRequiredQueryParameter"
    r = api.http.put(_block_url(url, _bid(2)), data=b"b", headers={"Content-MD5": md5_b64(b"c")})
    assert r.status_code == 400 and azure_code(r) == "Md5Mismatch"
    r = api.http.put(url + "&comp=blocklist", data=_block_list([("Latest", _bid(9))]))
    assert r.status_code == 400 and azure_code(r) == "InvalidBlockList"
    r = api.http.put(url + "&comp=blocklist", data=_block_list([("Committed", _bid(0))]))
    assert r.status_code == 400 and azure_code(r) == "InvalidBlockList"  # only uncommitted yet
    r = api.http.put(url + "&comp=blocklist", data=b"<NotAList/>")
    assert r.status_code == 400 and azure_code(r) == "InvalidXmlDocument"
    assert not api.sb.stats()["uploads"][g["uploadId"]]["committed"]


def test_get_block_list_needs_read_permission(api: Api) -> None:
    g = api.generate()  # default sp=cw
    assert api.http.put(_block_url(g["uploadURL"], _bid(0)), data=b"a").status_code == 201
    r = api.http.get(g["uploadURL"] + "&comp=blocklist&blocklisttype=all")
    assert r.status_code == 403 and azure_code(r) == "AuthorizationPermissionMismatch"


def test_put_blob_discards_uncommitted_blocks(api: Api) -> None:
    api.sb.set_faults({"upload_url_permissions": "rcw"})
    g = api.generate()
    url = g["uploadURL"]
    assert api.http.put(_block_url(url, _bid(0)), data=b"a").status_code == 201
    assert api.put(url, b"whole").status_code == 201
    r = api.http.get(url + "&comp=blocklist&blocklisttype=all")
    assert "<Block>" not in r.text
    got = api.http.get(url)
    assert got.status_code == 200 and got.content == b"whole"


def test_blob_requests_are_counted(api: Api) -> None:
    g = api.generate()
    api.put(g["uploadURL"], b"x")
    api.http.put(_block_url(g["uploadURL"], _bid(0)), data=b"y")
    api.http.put(g["uploadURL"] + "&comp=blocklist", data=_block_list([("Latest", _bid(0))]))
    api.http.put(g["uploadURL"] + "&comp=blocklist", data=_block_list([("Latest", _bid(5))]))
    s = api.sb.stats()
    assert s["requests"]["PUT blob"] == 1
    assert s["requests"]["PUT blob block"] == 1
    assert s["requests"]["PUT blob blocklist"] == 2
    assert s["statuses_by_route"]["PUT blob blocklist"] == {"201": 1, "400": 1}
    assert s["blob_requests"] == 4
    assert s["api_requests"] == 1  # blob traffic is not API traffic


def test_unknown_container_after_reset(api: Api) -> None:
    g = api.generate()
    api.sb.reset()
    r = api.put(g["uploadURL"], b"x")
    assert r.status_code == 404 and azure_code(r) == "ContainerNotFound"


def test_unsupported_verb(api: Api) -> None:
    g = api.generate()
    r = requests.post(g["uploadURL"], data=b"x", timeout=10)
    assert r.status_code == 405 and azure_code(r) == "UnsupportedHttpVerb"


def test_a_linked_file_keeps_its_bytes_when_the_blob_is_overwritten(api: Api) -> None:
    api.sb.set_faults({"duplicate_on_relink": True})
    task = api.sb.seed("tasks")
    g = api.generate()
    assert api.put(g["uploadURL"], b"first").status_code == 201
    first = api.link("tasks", task, g["uploadId"]).json()
    assert api.put(g["uploadURL"], b"second!").status_code == 201
    second = api.link("tasks", task, g["uploadId"]).json()
    assert api.request("GET", f"/files/{first['id']}/download").content == b"first"
    assert api.request("GET", f"/files/{second['id']}/download").content == b"second!"
    sizes = [f["size"] for f in api.sb.stats()["files"]]
    assert sizes == [5, 7]


def test_a_block_list_is_linked_not_copied_and_survives_recommits(api: Api) -> None:
    """Put Block List joins block files without a copy; a linked file keeps them all the same."""
    api.sb.set_faults({"duplicate_on_relink": True, "upload_url_permissions": "rcw"})
    task = api.sb.seed("tasks")
    g = api.generate()
    url = g["uploadURL"]
    upload_dir = api.sb.data_dir / "uploads" / g["uploadId"]
    parts = [bytes([97 + i]) * (3000 + i) for i in range(3)]
    for i, part in enumerate(parts):
        assert api.http.put(_block_url(url, _bid(i)), data=part).status_code == 201
    assert api.http.put(_block_url(url, _bid(9)), data=b"never listed").status_code == 201
    r = api.http.put(url + "&comp=blocklist",
                     data=_block_list([("Latest", _bid(i)) for i in range(3)]))
    assert r.status_code == 201, r.text
    # three block files and nothing else: no joined copy, the unlisted block is gone
    assert len(list(upload_dir.iterdir())) == 3
    first = b"".join(parts)
    assert api.http.get(url).content == first
    linked = api.link("tasks", task, g["uploadId"], "first.bin").json()
    # replace block 1 and recommit: the linked file still reads the old block 1
    assert api.http.put(_block_url(url, _bid(1)), data=b"new middle").status_code == 201
    r = api.http.put(url + "&comp=blocklist", data=_block_list(
        [("Committed", _bid(0)), ("Uncommitted", _bid(1)), ("Committed", _bid(2))]))
    assert r.status_code == 201, r.text
    second = parts[0] + b"new middle" + parts[2]
    assert api.http.get(url).content == second
    # then overwrite the whole blob with one Put Blob
    assert api.put(url, b"third").status_code == 201
    assert api.http.get(url).content == b"third"
    assert api.request("GET", f"/files/{linked['id']}/download").content == first
    up = api.sb.stats()["uploads"][g["uploadId"]]
    assert up["md5"] == hashlib.md5(b"third").hexdigest() and up["committed_blocks"] == 0
    # the linked file's three blocks and the blob's one file remain; the replaced block 1 and
    # the second list's blocks that nothing links are deleted
    assert len(list(upload_dir.iterdir())) == 4
