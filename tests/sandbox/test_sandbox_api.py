"""The awork API routes: each success and each error, over real HTTP."""

from __future__ import annotations

import hashlib
import http.client
import uuid
from urllib.parse import parse_qs, urlsplit

import pytest

from ops.sandbox.launcher import SandboxProcess

from .conftest import KEY_A2, KEY_B, PNG, Api, assert_awork_error

MULTIPART_ENTITIES = ("tasks", "projects", "documents", "tasktemplates", "companies", "users",
                      "workspaces", "projecttemplates")


def test_generate_upload_url(api: Api) -> None:
    r = api.request("POST", "/files/generateUploadURL", headers={"Content-Type": "application/json"})
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"uploadId", "uploadURL"}
    assert r.headers["Trace-Id"]
    url = urlsplit(body["uploadURL"])
    assert url.netloc == api.sb.upload_host
    assert url.path.endswith("/" + body["uploadId"])
    q = parse_qs(url.query)
    assert q["sr"] == ["b"] and q["sp"] == ["cw"] and q["sig"] and q["sv"]
    assert q["se"][0].endswith("Z") and "T" in q["se"][0]


def test_paths_are_case_insensitive(api: Api) -> None:
    for path in ("/files/generateuploadurl", "/FILES/GenerateUploadUrl", "/files/generateUploadURL/"):
        assert api.request("POST", path).status_code == 200, path


def test_three_step_upload_links_a_task_file(api: Api) -> None:
    task = api.sb.seed("tasks")
    data = b"hello awork" * 1000
    upload_id = api.upload(data, "text/plain")
    r = api.request("POST", f"/tasks/{task}/files/byUploadId",
                    json={"uploadId": upload_id, "fileName": "notes.txt", "description": "d"})
    assert r.status_code == 200, r.text
    info = r.json()
    uuid.UUID(info["id"])
    assert info["taskId"] == task and info["projectId"] is None
    assert info["entityType"] == "task"
    assert info["fileName"] == "notes.txt" and info["name"] == "notes.txt"
    assert info["description"] == "d"
    assert info["mimeType"] == "text/plain"
    assert info["fileVersions"][0]["size"] == len(data)
    assert info["fileVersions"][0]["version"] == 1
    d = api.request("GET", f"/files/{info['id']}/download")
    assert d.status_code == 200 and d.content == data
    assert "attachment" in d.headers["Content-Disposition"]


@pytest.mark.parametrize("entity,owner", [("projects", "projectId"), ("documents", "documentId"),
                                          ("tasktemplates", "taskTemplateId")])
def test_link_other_entities(api: Api, entity: str, owner: str) -> None:
    eid = api.sb.seed(entity)
    r = api.link(entity, eid, api.upload(b"x" * 10), "a.pdf")
    assert r.status_code == 200, r.text
    assert r.json()[owner] == eid
    assert r.json()["mimeType"] == "application/pdf"  # octet-stream blob: guessed from the name


def test_auth_missing_and_unknown_token(sb: SandboxProcess) -> None:
    for key in (None, "nope"):
        r = Api(sb, key).request("POST", "/files/generateuploadurl")
        assert_awork_error(r, 401, "unauthorized")
        assert "X-RateLimit-Remaining-Second" not in r.headers
    r = Api(sb).http.post(sb.api_url + "/files/generateuploadurl",
                          headers={"Authorization": "Basic a2V5LWE6"})
    assert_awork_error(r, 401, "unauthorized")


def test_unknown_path_and_wrong_method(api: Api) -> None:
    assert_awork_error(api.request("GET", "/projects"), 404, "not-found")
    # GET .../files is not in the contract for companies (POST is)
    assert_awork_error(api.request("GET", "/companies/" + str(uuid.uuid4()) + "/files"), 405,
                       "method-not-allowed")
    assert_awork_error(api.request("DELETE", "/files/generateuploadurl"), 405,
                       "method-not-allowed")
    r = api.http.get(api.sb.api_url.replace("/api/v1", "/nothing"))
    assert_awork_error(r, 404, "not-found")


def test_link_unknown_entity_is_404(api: Api) -> None:
    upload_id = api.upload(b"abc")
    assert_awork_error(api.link("tasks", str(uuid.uuid4()), upload_id), 404, "not-found")
    assert_awork_error(api.link("tasks", "not-a-guid", upload_id), 404, "not-found")
    # seeded as a project, not a task
    pid = api.sb.seed("projects")
    assert_awork_error(api.link("tasks", pid, upload_id), 404, "not-found")


def test_entity_of_another_workspace_is_404(api: Api) -> None:
    task = api.sb.seed("tasks", workspace="ws-b")
    assert_awork_error(api.link("tasks", task, api.upload(b"abc")), 404, "not-found")
    b = Api(api.sb, KEY_B)
    assert b.link("tasks", task, b.upload(b"abc")).status_code == 200


@pytest.mark.parametrize(
    "body,props",
    [
        ({"fileName": "a"}, {"uploadId"}),
        ({"uploadId": "x"}, {"fileName"}),
        ({"uploadId": "", "fileName": "a"}, {"uploadId"}),
        ({"uploadId": 5, "fileName": "a"}, {"uploadId"}),
        ({"uploadId": "x", "fileName": "a", "description": 3}, {"description"}),
        ({"uploadId": "x", "fileName": "a", "color": "red"}, {"color"}),
        ([1, 2], {"$"}),
    ],
)
def test_link_bad_body_is_validation_failed(api: Api, body: object, props: set[str]) -> None:
    task = api.sb.seed("tasks")
    r = api.request("POST", f"/tasks/{task}/files/byuploadid", json=body)
    err = assert_awork_error(r, 400, "validation-failed")
    assert {v["property"] for v in err["validationErrors"]} == props


def test_link_body_not_json(api: Api) -> None:
    task = api.sb.seed("tasks")
    r = api.request("POST", f"/tasks/{task}/files/byuploadid", data=b"{nope",
                    headers={"Content-Type": "application/json"})
    assert_awork_error(r, 400, "validation-failed")
    r = api.request("POST", f"/tasks/{task}/files/byuploadid", data=b"uploadId=x",
                    headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert_awork_error(r, 415, "unsupported-media-type")


def test_property_names_are_case_insensitive(api: Api) -> None:
    task = api.sb.seed("tasks")
    r = api.request("POST", f"/tasks/{task}/files/byuploadid",
                    json={"UploadId": api.upload(b"z"), "FileName": "z.txt"})
    assert r.status_code == 200, r.text


def test_link_unknown_or_uncommitted_upload(api: Api) -> None:
    task = api.sb.seed("tasks")
    err = assert_awork_error(api.link("tasks", task, "no-such-upload"), 400, "invalid-operation")
    assert "unknown" in err["description"]
    g = api.generate()  # never PUT
    err = assert_awork_error(api.link("tasks", task, g["uploadId"]), 400, "invalid-operation")
    assert "No file has been uploaded" in err["description"]
    # an upload of another workspace is unknown here
    other = Api(api.sb, KEY_B).upload(b"b")
    assert_awork_error(api.link("tasks", task, other), 400, "invalid-operation")
    # another key of the same workspace may link it
    same_ws = Api(api.sb, KEY_A2).upload(b"a2")
    assert api.link("tasks", task, same_ws).status_code == 200


def test_second_link_is_rejected_by_default(api: Api) -> None:
    task = api.sb.seed("tasks")
    upload_id = api.upload(b"once")
    assert api.link("tasks", task, upload_id).status_code == 200
    assert_awork_error(api.link("tasks", task, upload_id), 400, "duplication-violation")
    stats = api.sb.stats()
    assert stats["links"][upload_id] == 1 and stats["link_attempts"][upload_id] == 2
    assert len(stats["files"]) == 1


def test_duplicate_on_relink_creates_a_second_file(api: Api) -> None:
    api.sb.set_faults({"duplicate_on_relink": True})
    task = api.sb.seed("tasks")
    upload_id = api.upload(b"twice")
    first = api.link("tasks", task, upload_id).json()
    second = api.link("tasks", task, upload_id).json()
    assert first["id"] != second["id"]
    stats = api.sb.stats()
    assert stats["links"][upload_id] == 2
    assert [f["upload_id"] for f in stats["files"]] == [upload_id, upload_id]


def test_image_link(api: Api) -> None:
    project = api.sb.seed("projects")
    upload_id = api.upload(PNG, "image/png")
    r = api.request("POST", f"/files/images/projects/{project}/byUploadId",
                    json={"uploadId": upload_id, "fileName": "logo.png"})
    assert r.status_code == 200, r.text
    assert r.json()["projectId"] == project
    img = api.request("GET", f"/files/images/projects/{project}")
    assert img.status_code == 200 and img.content == PNG
    files = api.sb.stats()["files"]
    assert files[0]["image"] is True and files[0]["entity"] == "projects"


def test_image_link_errors(api: Api) -> None:
    project = api.sb.seed("projects")
    task = api.sb.seed("tasks")
    png = api.upload(PNG)
    r = api.request("POST", f"/files/images/tasks/{task}/byuploadid",
                    json={"uploadId": png, "fileName": "a.png"})
    assert_awork_error(r, 400, "validation-failed")  # tasks have no profile image
    r = api.request("POST", f"/files/images/users/{uuid.uuid4()}/byuploadid",
                    json={"uploadId": png, "fileName": "a.png"})
    assert_awork_error(r, 404, "not-found")
    r = api.request("POST", f"/files/images/projects/{project}/byuploadid",
                    json={"uploadId": api.upload(b"not an image at all"), "fileName": "a.png"})
    assert_awork_error(r, 400, "validation-failed")


@pytest.mark.parametrize("entity", MULTIPART_ENTITIES)
def test_multipart_upload_every_entity(api: Api, entity: str) -> None:
    eid = api.sb.seed(entity)
    data = bytes(range(256)) * 40
    r = api.request("POST", f"/{entity}/{eid}/files",
                    files={"File": ("report.csv", data, "text/csv")})
    assert r.status_code == 200, r.text
    info = r.json()
    assert info["fileName"] == "report.csv" and info["mimeType"] == "text/csv"
    assert info["fileVersions"][0]["size"] == len(data)
    f = api.sb.stats()["files"][0]
    assert f["md5"] == hashlib.md5(data).hexdigest() and f["upload_id"] is None
    assert f["entity"] == entity and f["entity_id"] == eid
    assert api.request("GET", f"/files/{info['id']}/download").content == data


def test_multipart_accepts_lowercase_part_and_form_fields(api: Api) -> None:
    task = api.sb.seed("tasks")
    r = api.request("POST", f"/tasks/{task}/files",
                    files={"file": ("a.txt", b"abc")},
                    data={"name": "Shown name", "description": "why"})
    assert r.status_code == 200, r.text
    assert r.json()["name"] == "Shown name" and r.json()["description"] == "why"


def test_multipart_errors(api: Api) -> None:
    task = api.sb.seed("tasks")
    r = api.request("POST", f"/tasks/{task}/files", files={"Other": ("a.txt", b"abc")})
    err = assert_awork_error(r, 400, "validation-failed")
    assert err["validationErrors"][0]["property"] == "File"
    r = api.request("POST", f"/tasks/{task}/files", data=b"raw",
                    headers={"Content-Type": "application/octet-stream"})
    assert_awork_error(r, 415, "unsupported-media-type")
    r = api.request("POST", f"/tasks/{uuid.uuid4()}/files", files={"File": ("a.txt", b"abc")})
    assert_awork_error(r, 404, "not-found")


def test_multipart_over_the_cap_while_streaming(api: Api) -> None:
    api.sb.set_faults({"multipart_max_bytes": 1000})
    task = api.sb.seed("tasks")
    r = api.request("POST", f"/tasks/{task}/files", files={"File": ("a.bin", b"x" * 1001)})
    assert_awork_error(r, 400, "request-body-too-large")
    r = api.request("POST", f"/tasks/{task}/files", files={"File": ("a.bin", b"x" * 1000)})
    assert r.status_code == 200
    assert len(api.sb.stats()["files"]) == 1


def test_multipart_over_the_cap_by_content_length_is_refused_unread(api: Api) -> None:
    task = api.sb.seed("tasks")
    host, port = api.sb.api_url.split("//")[1].split("/")[0].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.putrequest("POST", f"/api/v1/tasks/{task}/files")
    conn.putheader("Authorization", "Bearer key-a")
    conn.putheader("Content-Type", "multipart/form-data; boundary=b")
    conn.putheader("Content-Length", str(5 * 1000**3))  # 5 GB announced, a few bytes sent
    conn.endheaders(b'--b\r\nContent-Disposition: form-data; name="File"; filename="a"\r\n\r\n')
    resp = conn.getresponse()
    assert resp.status == 400
    assert b"request-body-too-large" in resp.read()
    conn.close()


def test_image_multipart(api: Api) -> None:
    user = api.sb.seed("users")
    r = api.request("POST", f"/files/images/users/{user}", files={"File": ("me.png", PNG)})
    assert r.status_code == 200, r.text
    assert r.json()["userId"] == user and r.json()["mimeType"] == "image/png"
    r = api.request("POST", f"/files/images/users/{user}", files={"File": ("me.png", b"GIF8")})
    assert_awork_error(r, 400, "validation-failed")
    r = api.request("POST", f"/files/images/documents/{user}", files={"File": ("me.png", PNG)})
    assert_awork_error(r, 400, "validation-failed")


def test_list_files_paged(api: Api) -> None:
    task = api.sb.seed("tasks")
    names = [f"f{i}.txt" for i in range(5)]
    for n in names:
        assert api.link("tasks", task, api.upload(n.encode()), n).status_code == 200
    r = api.request("GET", f"/tasks/{task}/files", params={"page": 2, "pageSize": 2})
    assert r.status_code == 200
    assert [f["fileName"] for f in r.json()] == names[2:4]
    assert r.headers["aw-page"] == "2" and r.headers["aw-pagesize"] == "2"
    assert r.headers["aw-items"] == "2" and r.headers["aw-totalitems"] == "5"
    r = api.request("GET", f"/tasks/{task}/files")
    assert len(r.json()) == 5 and r.headers["aw-pagesize"] == "10"
    assert_awork_error(api.request("GET", f"/tasks/{task}/files", params={"pageSize": 1001}),
                       400, "validation-failed")
    assert_awork_error(api.request("GET", f"/tasks/{task}/files", params={"page": "x"}),
                       400, "validation-failed")
    assert_awork_error(api.request("GET", f"/tasks/{uuid.uuid4()}/files"), 404, "not-found")
    one = r.json()[0]
    meta = api.request("GET", f"/tasks/{task}/files/{one['id']}")
    assert meta.status_code == 200 and meta.json() == one
    assert api.request("GET", f"/tasks/{task}/files/{one['id']}/download").content == b"f0.txt"


def test_download_errors(api: Api) -> None:
    assert_awork_error(api.request("GET", f"/files/{uuid.uuid4()}/download"), 404, "not-found")
    task = api.sb.seed("tasks")
    info = api.link("tasks", task, api.upload(b"mine"), "m.txt").json()
    # another workspace cannot read it
    r = Api(api.sb, KEY_B).request("GET", f"/files/{info['id']}/download")
    assert_awork_error(r, 404, "not-found")


def test_every_response_has_a_trace_id(api: Api) -> None:
    task = api.sb.seed("tasks")
    responses = [
        api.request("POST", "/files/generateuploadurl"),
        api.request("GET", f"/tasks/{task}/files"),
        api.request("GET", "/nowhere"),
        Api(api.sb, None).request("GET", f"/tasks/{task}/files"),
    ]
    ids = [r.headers["Trace-Id"] for r in responses]
    assert all(len(i) == 32 for i in ids) and len(set(ids)) == len(ids)


def test_link_body_over_the_cap(api: Api) -> None:
    task = api.sb.seed("tasks")
    big = {"uploadId": "x", "fileName": "a", "description": "d" * (2 << 20)}
    r = api.request("POST", f"/tasks/{task}/files/byuploadid", json=big)
    assert_awork_error(r, 400, "request-body-too-large")
