"""One sandbox subprocess for the sandbox suite, reset (entities, faults, counters) per test."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from ops.sandbox.launcher import SandboxProcess

KEY_A = "key-a"
KEY_A2 = "key-a2"  # a second key of workspace ws-a
KEY_B = "key-b"
ADMIN = "admin-token"
REPO = Path(__file__).resolve().parents[2]
# The repository keeps its own copy of awork's contract (ops/contract/README.md says where from).
CONTRACT = REPO / "ops" / "contract" / "awork-openapi-files.json"
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 200


def md5_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


class Api:
    """A thin awork client for tests: base URL + bearer key, never raises on status."""

    def __init__(self, sb: SandboxProcess, key: str | None = KEY_A) -> None:
        self.sb = sb
        self.base = sb.api_url
        self.key = key
        self.http = requests.Session()

    def headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        h = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        h.update(extra or {})
        return h

    def request(self, method: str, path: str, **kw: Any) -> requests.Response:
        headers = self.headers(kw.pop("headers", None))
        return self.http.request(method, self.base + path, headers=headers, timeout=30, **kw)

    def generate(self) -> dict[str, str]:
        r = self.request("POST", "/files/generateuploadurl")
        assert r.status_code == 200, r.text
        return dict(r.json())

    def put(self, url: str, data: bytes, headers: dict[str, str] | None = None) -> requests.Response:
        h = {"x-ms-blob-type": "BlockBlob", "Content-Type": "application/octet-stream"}
        h.update(headers or {})
        return self.http.put(url, data=data, headers=h, timeout=30)

    def upload(self, data: bytes, content_type: str = "application/octet-stream") -> str:
        """Generate + Put Blob; returns the uploadId."""
        g = self.generate()
        r = self.put(g["uploadURL"], data, {"Content-Type": content_type})
        assert r.status_code == 201, r.text
        return g["uploadId"]

    def link(self, entity: str, entity_id: str, upload_id: str, file_name: str = "f.bin",
             **extra: Any) -> requests.Response:
        body = {"uploadId": upload_id, "fileName": file_name, **extra}
        return self.request("POST", f"/{entity}/{entity_id}/files/byuploadid", json=body)


@pytest.fixture(scope="session")
def sandbox_proc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SandboxProcess]:
    proc = SandboxProcess(
        api_keys={KEY_A: "ws-a", KEY_A2: "ws-a", KEY_B: "ws-b"},
        admin_token=ADMIN,
        data_dir=tmp_path_factory.mktemp("sandbox-data"),
        # Generous limits by default: only the rate-limit tests tighten them.
        extra_args=["--seed", "7", "--rate-limit-per-minute", "1000000",
                    "--rate-limit-per-second", "100000"],
    )
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture
def sb(sandbox_proc: SandboxProcess) -> SandboxProcess:
    sandbox_proc.reset(entities=True, faults=True)
    return sandbox_proc


@pytest.fixture
def api(sb: SandboxProcess) -> Api:
    return Api(sb)


@pytest.fixture
def contract() -> dict[str, Any]:
    return dict(json.loads(CONTRACT.read_text()))


def assert_awork_error(r: requests.Response, status: int, code: str) -> dict[str, Any]:
    """awork's error shape: every ErrorResponse key, the trace id echoed in Trace-Id."""
    assert r.status_code == status, r.text
    assert r.headers["Content-Type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"code", "description", "link", "details", "validationErrors", "traceId"}
    assert body["code"] == code, body
    assert body["traceId"] == r.headers["Trace-Id"]
    return dict(body)


def azure_code(r: requests.Response) -> str:
    import xml.etree.ElementTree as ET

    root = ET.fromstring(r.content)
    assert root.tag == "Error"
    code = root.findtext("Code")
    assert code == r.headers.get("x-ms-error-code")
    return str(code)
