"""Azurite (the open-source Azure Storage emulator) on a private loopback port.

The blob tests and the PUT benchmark need a real Azure-compatible endpoint: Azurite checks
Content-MD5, keeps uncommitted blocks, enforces SAS signatures and expiry. We sign service SAS
URLs ourselves (HMAC-SHA256 over Azure's string-to-sign for `sv` 2020-12-06 and later), which is
exactly what awork hands us as an upload URL, so no Azure SDK is needed.

    with Azurite() as az:
        url = az.blob_sas_url("uploads", "a.bin", permissions="cw", expires_in=600)
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import quote, urlencode

import requests

ACCOUNT = "devstoreaccount1"
# Azurite's well-known development key (published in Azure's docs; not a secret).
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
# Any sv >= 2020-12-06 uses the same 16-line service-SAS string-to-sign (with encryption scope).
SAS_VERSION = "2021-08-06"

REPO_ROOT = Path(__file__).resolve().parent.parent


class AzuriteUnavailable(RuntimeError):
    """node or the azurite-blob binary is missing (tests skip on this, except under CI)."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_azurite_blob() -> Path:
    """`node_modules/.bin/azurite-blob` (installed by `make node` / `npm install`) and node."""
    binary = REPO_ROOT / "node_modules" / ".bin" / "azurite-blob"
    if shutil.which("node") is None:
        raise AzuriteUnavailable("node is not installed: Azurite (the Azure Storage emulator) needs it")
    if not binary.exists():
        raise AzuriteUnavailable(f"{binary} is missing: run `npm install` (or `make node`) in {REPO_ROOT}")
    return binary


def _iso(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _sign(string_to_sign: str, key: str = ACCOUNT_KEY) -> str:
    digest = hmac.new(base64.b64decode(key), string_to_sign.encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def service_sas(
    container: str,
    blob: str,
    *,
    permissions: str,
    expiry: dt.datetime,
    start: dt.datetime | None = None,
    account: str = ACCOUNT,
    key: str = ACCOUNT_KEY,
    version: str = SAS_VERSION,
) -> str:
    """A blob service SAS query string (`sv=...&sig=...`), signed with the account key."""
    st = _iso(start) if start else ""
    se = _iso(expiry)
    canonical = f"/blob/{account}/{container}/{blob}"
    string_to_sign = "\n".join(
        [
            permissions,  # sp
            st,  # st
            se,  # se
            canonical,
            "",  # si (stored access policy)
            "",  # sip
            "",  # spr
            version,  # sv
            "b",  # sr
            "",  # snapshot time
            "",  # ses (encryption scope)
            "",  # rscc
            "",  # rscd
            "",  # rsce
            "",  # rscl
            "",  # rsct
        ]
    )
    params = {"sv": version, "sr": "b", "sp": permissions, "se": se}
    if st:
        params["st"] = st
    params["sig"] = _sign(string_to_sign, key)
    return urlencode(params, quote_via=quote, safe="")


def account_sas(
    *,
    permissions: str = "rwdlacup",
    expiry: dt.datetime,
    account: str = ACCOUNT,
    key: str = ACCOUNT_KEY,
    version: str = SAS_VERSION,
) -> str:
    """An account SAS for the blob service (used only to create containers)."""
    se = _iso(expiry)
    string_to_sign = "\n".join([account, permissions, "b", "sco", "", se, "", "", version, "", ""])
    params = {"sv": version, "ss": "b", "srt": "sco", "sp": permissions, "se": se}
    params["sig"] = _sign(string_to_sign, key)
    return urlencode(params, quote_via=quote, safe="")


class Azurite:
    """An azurite-blob child process in its own session; `stop()` kills the whole group."""

    def __init__(self, location: Path | None = None, port: int | None = None) -> None:
        self._own_location = location is None
        self.location = Path(location) if location else Path(tempfile.mkdtemp(prefix="azurite-"))
        self.port = port or _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = self.location / "azurite.log"

    @property
    def endpoint(self) -> str:
        """The account's blob endpoint (path-style, as Azurite serves it)."""
        return f"http://127.0.0.1:{self.port}/{ACCOUNT}"

    @property
    def host(self) -> str:
        """`host:port` for an upload-host allow-list."""
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> Azurite:
        binary = find_azurite_blob()
        self.location.mkdir(parents=True, exist_ok=True)
        args = [
            str(binary),
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
            str(self.port),
            "--location",
            str(self.location),
            "--silent",
            "--disableTelemetry",
            "--skipApiVersionCheck",
        ]
        with open(self._log, "ab") as log:
            self.proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while True:
            try:
                requests.get(f"{self.endpoint}?comp=list", timeout=1)
                return self
            except requests.RequestException:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    log_text = self._log.read_text(errors="replace")[-2000:]
                    self.stop()
                    raise RuntimeError(f"Azurite did not start on port {self.port}: {log_text}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
            except ProcessLookupError:
                pass
        self.proc = None
        if self._own_location:
            shutil.rmtree(self.location, ignore_errors=True)

    def __enter__(self) -> Azurite:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- containers and blobs ------------------------------------------------------------

    def create_container(self, name: str) -> None:
        """Create a container (an existing one is fine)."""
        sas = account_sas(expiry=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1))
        r = requests.put(f"{self.endpoint}/{name}?restype=container&{sas}", timeout=10)
        if r.status_code not in (201, 409):
            raise RuntimeError(f"create container {name}: {r.status_code} {r.text[:300]}")

    def blob_url(self, container: str, blob: str) -> str:
        return f"{self.endpoint}/{container}/{quote(blob)}"

    def blob_sas_url(
        self,
        container: str,
        blob: str,
        *,
        permissions: str = "cw",
        expires_in: float = 3600.0,
        start_offset: float | None = None,
    ) -> str:
        """A pre-signed URL like awork's upload URL: `permissions` c/w (create, write), r (read)."""
        now = dt.datetime.now(dt.UTC)
        start = now + dt.timedelta(seconds=start_offset) if start_offset is not None else None
        sas = service_sas(
            container,
            blob,
            permissions=permissions,
            expiry=now + dt.timedelta(seconds=expires_in),
            start=start,
        )
        return f"{self.blob_url(container, blob)}?{sas}"

    def read_blob(self, container: str, blob: str) -> bytes:
        """The blob's bytes (fine for test-sized blobs)."""
        r = requests.get(self.blob_sas_url(container, blob, permissions="r", expires_in=600), timeout=60)
        r.raise_for_status()
        return r.content

    def blob_md5(self, container: str, blob: str) -> tuple[int, str]:
        """(size, MD5 in base64) of a blob, streamed: for benchmark-sized blobs."""
        url = self.blob_sas_url(container, blob, permissions="r", expires_in=3600)
        digest = hashlib.md5()
        size = 0
        with requests.get(url, stream=True, timeout=60) as r:
            r.raise_for_status()
            for chunk in r.iter_content(1 << 20):
                digest.update(chunk)
                size += len(chunk)
        return size, base64.b64encode(digest.digest()).decode()

    def delete_blob(self, container: str, blob: str) -> None:
        url = self.blob_sas_url(container, blob, permissions="d", expires_in=600)
        r = requests.delete(url, timeout=30)
        if r.status_code not in (202, 404):
            r.raise_for_status()

    def blob_properties(self, container: str, blob: str) -> dict[str, str]:
        """Response headers of Get Blob Properties (Content-Type, Content-MD5, ...)."""
        url = self.blob_sas_url(container, blob, permissions="r", expires_in=600)
        r = requests.head(url, timeout=10)
        r.raise_for_status()
        return dict(r.headers)


__all__ = [
    "ACCOUNT",
    "ACCOUNT_KEY",
    "Azurite",
    "AzuriteUnavailable",
    "account_sas",
    "find_azurite_blob",
    "service_sas",
]

if __name__ == "__main__":  # pragma: no cover - manual use
    with Azurite() as az:
        print(az.endpoint, flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
