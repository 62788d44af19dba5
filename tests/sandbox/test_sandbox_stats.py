"""The admin API: auth, entities, reset, and the counters tests of the fleet rely on."""

from __future__ import annotations

import hashlib
import uuid

import requests

from ops.sandbox.launcher import SandboxProcess

from .conftest import ADMIN, Api


def _admin(sb: SandboxProcess, method: str, path: str, token: str | None = ADMIN,
           **kw: object) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.request(method, sb.admin_url + path, headers=headers, timeout=10, **kw)  # type: ignore[arg-type]


def test_admin_needs_its_token(sb: SandboxProcess) -> None:
    for token in (None, "key-a", "wrong"):
        for method, path in (("GET", "/stats"), ("POST", "/reset"), ("POST", "/faults"),
                             ("POST", "/entities"), ("GET", "/entities")):
            assert _admin(sb, method, path, token).status_code == 401
    assert _admin(sb, "GET", "/health", None).json() == {"ok": True}
    assert _admin(sb, "GET", "/nope").status_code == 404


def test_seed_entities(sb: SandboxProcess) -> None:
    tid = str(uuid.uuid4())
    created = sb.seed_many([{"type": "tasks", "id": tid.upper()}, {"type": "Projects"}])
    assert created[0]["id"] == tid and created[1]["type"] == "projects"
    one = sb.seed("contactpersons")
    listed = sb.admin("GET", "/entities")
    assert {e["id"] for e in listed["tasks"]} == {tid}
    assert listed["contactpersons"][0]["id"] == one
    assert _admin(sb, "POST", "/entities", json={"type": "comments", "id": tid}).status_code == 400
    assert _admin(sb, "POST", "/entities", json={"type": "tasks", "id": "7"}).status_code == 400
    # upper-case ids in the API path find the entity
    api = Api(sb)
    assert api.request("GET", f"/tasks/{tid.upper()}/files").status_code == 200


def test_reset_keeps_entities_unless_asked(sb: SandboxProcess) -> None:
    api = Api(sb)
    task = sb.seed("tasks")
    api.link("tasks", task, api.upload(b"x"))
    sb.reset()
    s = sb.stats()
    assert s["files"] == [] and s["uploads"] == {} and s["api_requests"] == 0
    assert s["entities"]["tasks"] == 1
    sb.reset(entities=True)
    assert sb.stats()["entities"]["tasks"] == 0


def test_reset_faults_restores_start_settings(sb: SandboxProcess) -> None:
    start = sb.faults()
    sb.set_faults({"latency_ms": 3, "duplicate_on_relink": True})
    sb.reset()
    assert sb.faults()["latency_ms"] == 3
    sb.reset(faults=True)
    assert sb.faults() == start


def test_stats_counters(sb: SandboxProcess) -> None:
    api = Api(sb)
    task = sb.seed("tasks")
    project = sb.seed("projects")
    data = b"counted" * 100
    upload_id = api.upload(data, "text/plain")
    api.link("tasks", task, upload_id, "c.txt", description="about")
    api.link("tasks", task, upload_id, "c.txt")  # refused: duplicate
    api.request("POST", f"/projects/{project}/files", files={"File": ("m.bin", b"mp")})
    api.request("GET", f"/tasks/{task}/files")
    Api(sb, None).request("GET", f"/tasks/{task}/files")
    s = sb.stats()
    assert s["requests"] == {
        "POST /api/v1/files/generateuploadurl": 1,
        "PUT blob": 1,
        "POST /api/v1/{entity}/{id}/files/byuploadid": 2,
        "POST /api/v1/{entity}/{id}/files": 1,
        "GET /api/v1/{entity}/{id}/files": 2,
    }
    assert s["api_requests"] == 6 and s["unauthorized"] == 1
    assert s["statuses"] == {"200": 4, "201": 1, "400": 1, "401": 1}
    assert s["requests_by_workspace"] == {"ws-a": 5}
    assert s["links"] == {upload_id: 1} and s["link_attempts"] == {upload_id: 2}
    assert s["rate_limited"] == 0 and s["blob_authorization_headers"] == 0
    files = {f["file_name"]: f for f in s["files"]}
    linked = files["c.txt"]
    assert linked == {
        "id": linked["id"], "workspace": "ws-a", "entity": "tasks", "entity_id": task,
        "image": False, "name": "c.txt", "file_name": "c.txt", "description": "about",
        "size": len(data), "md5": hashlib.md5(data).hexdigest(),
        "content_md5": linked["content_md5"], "mime_type": "text/plain",
        "upload_id": upload_id, "created_on": linked["created_on"],
        "versions": [{"id": linked["versions"][0]["id"], "version": 1, "size": len(data),
                      "md5": hashlib.md5(data).hexdigest()}],
    }
    assert files["m.bin"]["upload_id"] is None and files["m.bin"]["entity"] == "projects"
