"""Starting and stopping: the CLI, the launcher, the three curl commands of an upload."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import requests

from ops.sandbox.cli import build_parser, main
from ops.sandbox.launcher import SandboxProcess, SandboxStartError

ENTITY_TYPES = {"tasks", "projects", "documents", "tasktemplates", "companies", "users",
                "workspaces", "projecttemplates", "contactpersons"}


def test_seed_demo_defaults_and_clean_sigint_stop() -> None:
    sb = SandboxProcess(api_keys={"k": "default"}, seed_demo=True)
    with sb:
        assert set(sb.entities) == ENTITY_TYPES
        assert all(len(ids) == 3 for ids in sb.entities.values())
        assert sb.api_url.startswith("http://127.0.0.1:") and sb.api_url.endswith("/api/v1")
        assert sb.admin_url.endswith("/_sandbox")
        api_port = sb.api_url.split(":")[2].split("/")[0]
        assert sb.upload_host.startswith("127.0.0.1:") and not sb.upload_host.endswith(api_port)
        task = sb.entities["tasks"][0]
        r = requests.get(f"{sb.api_url}/tasks/{task}/files",
                         headers={"Authorization": "Bearer k"}, timeout=10)
        assert r.status_code == 200
        # defaults: 1000/min, 50/s, 900 s URL lifetime
        assert r.headers["X-RateLimit-Limit-Minute"] == "1000"
        assert r.headers["X-RateLimit-Limit-Second"] == "50"
        settings = sb.faults()
        assert settings["upload_url_lifetime_s"] == 900
        assert settings["put_blob_max_bytes"] == 5000 * 1024 * 1024
        data_dir = Path(sb.values["SANDBOX_DATA_DIR"])
        assert data_dir.is_dir()
        assert sb.proc is not None
        sb.proc.send_signal(signal.SIGINT)
        assert sb.proc.wait(10) == 0
    assert not data_dir.exists()  # the default temporary directory is removed on exit
    assert "stopped" in sb.stderr_tail()


def test_sigterm_stops_cleanly(tmp_path: Path) -> None:
    sb = SandboxProcess(data_dir=tmp_path / "d").start()
    assert sb.stop() == 0
    assert (tmp_path / "d").is_dir()  # a given data dir is kept


def test_same_seed_and_flags_replay_the_same_faults() -> None:
    def run() -> list[int | str]:
        args = ["--seed", "99", "--fault", "generate:500=0.3", "--fault", "*:drop=0.1"]
        with SandboxProcess(api_keys={"k": "w"}, extra_args=args) as sb:
            out: list[int | str] = []
            for _ in range(30):
                try:
                    out.append(requests.post(f"{sb.api_url}/files/generateuploadurl",
                                             headers={"Authorization": "Bearer k"},
                                             timeout=10).status_code)
                except requests.ConnectionError:
                    out.append("drop")
            return out

    first = run()
    assert {200, 500, "drop"} <= set(first)
    assert run() == first


def test_launcher_reports_a_failed_start() -> None:
    with pytest.raises(SandboxStartError, match="ROUTE:KIND=PROBABILITY"):
        SandboxProcess(extra_args=["--fault", "nonsense"]).start()


def test_cli_help_and_flags() -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    args = build_parser().parse_args(["--api-key", "a", "--api-key", "b=ws2", "--port", "0"])
    assert args.api_key == ["a", "b=ws2"] and args.port == 0


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_the_seed_document_curl_commands(tmp_path: Path) -> None:
    """ops/sandbox/README.md's three curl commands, as a person would type them."""
    with SandboxProcess(api_keys={"KEY": "default"}, seed_demo=True) as sb:
        task = sb.entities["tasks"][0]
        png = tmp_path / "file.png"
        png.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(5000))

        def curl(*args: str) -> str:
            return subprocess.run(["curl", "-sS", "-f", *args], check=True, capture_output=True,
                                  text=True, timeout=30).stdout

        out = json.loads(curl("-X", "POST", f"{sb.api_url}/files/generateUploadURL",
                              "-H", "Authorization: Bearer KEY",
                              "-H", "Content-Type: application/json"))
        curl("-X", "PUT", out["uploadURL"], "-H", "Content-Type: image/png",
             "-H", "x-ms-blob-type: BlockBlob", "-T", str(png))
        linked = json.loads(curl(
            "-X", "POST", f"{sb.api_url}/tasks/{task}/files/byUploadId",
            "-H", "Authorization: Bearer KEY", "-H", "Content-Type: application/json",
            "-d", json.dumps({"uploadId": out["uploadId"], "fileName": "file.png"})))
        assert linked["taskId"] == task
        files = sb.stats()["files"]
        assert [(f["file_name"], f["size"], f["mime_type"]) for f in files] == [
            ("file.png", 5008, "image/png")]


@pytest.mark.slow
def test_a_2gib_put_does_not_grow_memory() -> None:
    """Bodies stream to disk: a 2 GiB Put Blob may not grow the sandbox by more than 64 MiB."""
    import http.client
    from urllib.parse import urlsplit

    size = 2 << 30
    with SandboxProcess(api_keys={"k": "w"}) as sb:
        headers = {"Authorization": "Bearer k"}
        g = requests.post(f"{sb.api_url}/files/generateuploadurl", headers=headers,
                          timeout=10).json()
        # warm up the code paths, then measure from here
        warm = requests.put(g["uploadURL"], data=b"w" * (4 << 20),
                            headers={"x-ms-blob-type": "BlockBlob"}, timeout=30)
        assert warm.status_code == 201
        status = Path(f"/proc/{sb.pid}/status")
        try:
            with open(f"/proc/{sb.pid}/clear_refs", "w") as f:
                f.write("5")  # reset the peak (VmHWM) to the current RSS
        except OSError:
            pass  # not permitted: the start-up peak stays in, which only makes this stricter
        before = _kib(status, "VmRSS")
        url = urlsplit(g["uploadURL"])
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=120)
        conn.putrequest("PUT", f"{url.path}?{url.query}")
        conn.putheader("x-ms-blob-type", "BlockBlob")
        conn.putheader("Content-Length", str(size))
        conn.endheaders()
        chunk = os.urandom(1 << 20)
        t = time.monotonic()
        for _ in range(size // len(chunk)):
            conn.send(chunk)
        resp = conn.getresponse()
        assert resp.status == 201, resp.read()
        conn.close()
        seconds = time.monotonic() - t
        peak = _kib(status, "VmHWM")
        grew_mib = (peak - before) / 1024
        assert grew_mib <= 64, f"grew {grew_mib:.1f} MiB"
        up = sb.stats()["uploads"][g["uploadId"]]
        assert up["size"] == size
        print(f"2 GiB in {seconds:.1f}s, memory grew {grew_mib:.1f} MiB")


def _kib(status: Path, field: str) -> int:
    for line in status.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(field)
