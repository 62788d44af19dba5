"""The sandbox's versions and byurl routes, against awork's contract, over real HTTP."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import requests

from ops.sandbox.app import build_router

from .conftest import Api, assert_awork_error

ENTITIES = ("tasks", "projects", "documents", "tasktemplates", "companies", "users", "workspaces",
            "projecttemplates")


class _Files(BaseHTTPRequestHandler):
    """A loopback test server: GET /<name> answers the bytes registered under that name."""

    bodies: dict[str, bytes] = {}

    def do_GET(self) -> None:
        body = self.bodies.get(self.path.lstrip("/"))
        if body is None:
            self.send_response(404)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/csv")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def file_server() -> Iterator[tuple[str, dict[str, bytes]]]:
    bodies: dict[str, bytes] = {}
    handler = type("H", (_Files,), {"bodies": bodies})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", bodies
    server.shutdown()
    server.server_close()


def test_every_versions_and_byurl_route_of_the_contract_is_served(contract: dict[str, Any]) -> None:
    served = {(r.method, r.path) for r in build_router().routes}
    wanted = set()
    for path, _ops in contract["paths"].items():
        if path.endswith("/files/{fileId}/versions"):
            wanted |= {("POST", path), ("GET", path)}
        if path.endswith("/files/byurl"):
            wanted.add(("POST", path))
    assert len(wanted) == 3 * len(ENTITIES)
    assert wanted <= served, sorted(wanted - served)


def _multipart_file(api: Api, entity: str, entity_id: str, data: bytes, name: str = "r.csv") -> str:
    r = api.request("POST", f"/{entity}/{entity_id}/files", files={"File": (name, data, "text/csv")})
    assert r.status_code == 200, r.text
    return str(r.json()["id"])


@pytest.mark.parametrize("entity", ENTITIES)
def test_a_new_version_becomes_the_files_content(api: Api, contract: dict[str, Any], entity: str) -> None:
    eid = api.sb.seed(entity)
    file_id = _multipart_file(api, entity, eid, b"v1")
    r = api.request("POST", f"/{entity}/{eid}/files/{file_id}/versions",
                    files={"File": ("r.csv", b"version two", "text/csv")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == set(contract["components"]["schemas"]["FileVersion"]["properties"])
    assert body["version"] == 2 and body["size"] == len(b"version two") and body["fileInfoId"] == file_id
    listed = api.request("GET", f"/{entity}/{eid}/files/{file_id}/versions", params={"pageSize": 1,
                                                                                     "page": 2})
    assert listed.status_code == 200 and [v["id"] for v in listed.json()] == [body["id"]]
    assert listed.headers["aw-totalitems"] == "2"
    assert api.request("GET", f"/files/{file_id}/download").content == b"version two"
    stats = next(f for f in api.sb.stats()["files"] if f["id"] == file_id)
    assert [v["md5"] for v in stats["versions"]] == [hashlib.md5(b"v1").hexdigest(),
                                                      hashlib.md5(b"version two").hexdigest()]


def test_version_errors(api: Api) -> None:
    task = api.sb.seed("tasks")
    other = api.sb.seed("tasks")
    file_id = _multipart_file(api, "tasks", task, b"v1")
    # a file of another task is not found under this one
    r = api.request("POST", f"/tasks/{other}/files/{file_id}/versions", files={"File": ("a", b"x")})
    assert_awork_error(r, 404, "not-found")
    r = api.request("POST", f"/tasks/{task}/files/{file_id}/versions", files={"Other": ("a", b"x")})
    assert_awork_error(r, 400, "validation-failed")


def test_stall_after_applies_then_drops(api: Api) -> None:
    task = api.sb.seed("tasks")
    file_id = _multipart_file(api, "tasks", task, b"v1")
    api.sb.set_faults({"routes": {"versions": {"stall_after": 1.0}}, "stall_after_s": 5})
    with pytest.raises(requests.exceptions.ReadTimeout):
        api.http.post(api.base + f"/tasks/{task}/files/{file_id}/versions",
                      headers=api.headers(), files={"File": ("r.csv", b"v2")}, timeout=(5, 1))
    versions = next(f for f in api.sb.stats()["files"] if f["id"] == file_id)["versions"]
    assert len(versions) == 2  # applied although the client never saw an answer
    assert api.sb.stats()["faults_injected"]["stall_after"] == 1


def test_byurl_fetches_from_a_loopback_server(api: Api, file_server: tuple[str, dict[str, bytes]],
                                              contract: dict[str, Any]) -> None:
    base, bodies = file_server
    bodies["export.csv"] = b"a,b\n1,2\n" * 100
    task = api.sb.seed("tasks")
    r = api.request("POST", f"/tasks/{task}/files/byUrl",
                    json={"url": f"{base}/export.csv", "name": "Export.csv", "description": "d"})
    assert r.status_code == 200, r.text
    info = r.json()
    assert set(info) == set(contract["components"]["schemas"]["FileInfo"]["properties"])
    assert info["fileName"] == "Export.csv" and info["fileVersions"][0]["size"] == len(bodies["export.csv"])
    assert api.request("GET", f"/files/{info['id']}/download").content == bodies["export.csv"]
    assert api.sb.stats()["byurl_fetches"] == 1


def test_byurl_refusals(api: Api, file_server: tuple[str, dict[str, bytes]]) -> None:
    base, bodies = file_server
    task = api.sb.seed("tasks")
    path = f"/tasks/{task}/files/byurl"
    body = assert_awork_error(api.request("POST", path, json={"url": "http://192.0.2.1/x.csv"}),
                              400, "invalid-operation")
    assert "loopback" in body["details"][0]
    assert_awork_error(api.request("POST", path, json={"url": f"{base}/missing"}), 400, "invalid-operation")
    assert_awork_error(api.request("POST", path, json={"name": "x"}), 400, "validation-failed")
    assert_awork_error(api.request("POST", path, json={"url": f"{base}/x", "extra": 1}),
                       400, "validation-failed")
    bodies["big.bin"] = b"x" * 2000
    api.sb.set_faults({"byurl_max_bytes": 1000})
    assert_awork_error(api.request("POST", path, json={"url": f"{base}/big.bin"}),
                       400, "request-body-too-large")
    assert [f for f in api.sb.stats()["files"] if f["entity_id"] == task] == []
