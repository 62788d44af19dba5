"""Start a sandbox subprocess for tests and benchmarks, and talk to its admin API.

`python -m ops.sandbox` on a free port, stdout and stderr read by threads (a full pipe would
freeze the sandbox), ready when it prints SANDBOX_READY=1; if it dies first, the error
carries the tail of its stderr. Used by every engineer's tests: keep it boring and robust.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import requests

_REPO_ROOT = Path(__file__).resolve().parents[2]


class SandboxStartError(RuntimeError):
    """The sandbox exited or stayed silent while starting."""


class SandboxProcess:
    """`with SandboxProcess(api_keys={"key": "ws"}) as sb: ...`; see ops/sandbox/README.md."""

    def __init__(
        self,
        api_keys: dict[str, str] | None = None,
        admin_token: str = "sandbox-admin",
        data_dir: Path | str | None = None,
        extra_args: list[str] | tuple[str, ...] = (),
        seed_demo: bool = False,
        start_timeout: float = 20.0,
        env: dict[str, str] | None = None,
        python: str | None = None,
        wrapper: list[str] | tuple[str, ...] = (),
    ) -> None:
        self.api_keys = dict(api_keys) if api_keys is not None else {"sandbox-key": "default"}
        self.admin_token = admin_token
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.extra_args = list(extra_args)
        self.seed_demo = seed_demo
        self.start_timeout = start_timeout
        self.env = env
        self.python = python or sys.executable
        self.wrapper = list(wrapper)  # e.g. ["taskset", "-c", "0"] for the benchmarks
        self.proc: subprocess.Popen[str] | None = None
        self.values: dict[str, str] = {}
        self.stdout_lines: list[str] = []
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=200)
        self._ready = threading.Event()
        self._threads: list[threading.Thread] = []
        self._http = requests.Session()

    # --- lifecycle -------------------------------------------------------------------------

    def command(self) -> list[str]:
        """The command line; the keys and the admin token go in the environment (see start())."""
        cmd = [*self.wrapper, self.python, "-m", "ops.sandbox", "--host", "127.0.0.1", "--port", "0"]
        if self.data_dir is not None:
            cmd += ["--data-dir", str(self.data_dir)]
        if self.seed_demo:
            cmd.append("--seed-demo")
        return cmd + self.extra_args

    def start(self) -> SandboxProcess:
        env = dict(os.environ if self.env is None else self.env)
        env["AWORK_SANDBOX_API_KEY"] = ",".join(f"{key}={ws}" for key, ws in self.api_keys.items())
        env["AWORK_SANDBOX_ADMIN_TOKEN"] = self.admin_token
        # Importable from a checkout even without `pip install -e .`.
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(_REPO_ROOT), env.get("PYTHONPATH", "")) if p
        )
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.proc = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
            env=env,
            start_new_session=True,  # a Ctrl-C in the test terminal is the harness's to send
        )
        for target, stream in ((self._read_stdout, self.proc.stdout),
                               (self._read_stderr, self.proc.stderr)):
            t = threading.Thread(target=target, args=(stream,), daemon=True,
                                 name=f"sandbox-{target.__name__}")
            t.start()
            self._threads.append(t)
        deadline = time.monotonic() + self.start_timeout
        while not self._ready.wait(0.05):
            if self.proc.poll() is not None:
                self._join_readers()
                raise SandboxStartError(
                    f"sandbox exited with {self.proc.returncode} while starting:\n"
                    + self.stderr_tail()
                )
            if time.monotonic() > deadline:
                self.stop()
                raise SandboxStartError(
                    f"sandbox not ready after {self.start_timeout}s:\n" + self.stderr_tail()
                )
        return self

    def _read_stdout(self, stream: Any) -> None:
        for line in stream:
            line = line.rstrip("\n")
            self.stdout_lines.append(line)
            key, sep, value = line.partition("=")
            if sep and key.isupper():
                self.values[key] = value
            if line == "SANDBOX_READY=1":
                self._ready.set()

    def _read_stderr(self, stream: Any) -> None:
        for line in stream:
            self._stderr_tail.append(line.rstrip("\n"))

    def _join_readers(self) -> None:
        for t in self._threads:
            t.join(timeout=2)

    def stderr_tail(self, lines: int = 40) -> str:
        return "\n".join(list(self._stderr_tail)[-lines:])

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit code."""
        self._http.close()
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        self._join_readers()
        return proc.returncode

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def __enter__(self) -> SandboxProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- what it printed -------------------------------------------------------------------

    @property
    def api_url(self) -> str:
        return self.values["AWORK_API_URL"]

    @property
    def upload_host(self) -> str:
        return self.values["AWORK_UPLOAD_HOSTS"]

    @property
    def admin_url(self) -> str:
        return self.values["SANDBOX_ADMIN_URL"]

    @property
    def fault_seed(self) -> int:
        """The --seed the sandbox runs with (random unless given in extra_args)."""
        return int(self.values["SANDBOX_SEED"])

    @property
    def entities(self) -> dict[str, list[str]]:
        raw = self.values.get("SANDBOX_ENTITIES")
        return json.loads(raw) if raw else {}

    @property
    def api_key(self) -> str:
        """The first API key (handy when there is only one)."""
        return next(iter(self.api_keys))

    # --- admin API -------------------------------------------------------------------------

    def admin(self, method: str, path: str, body: Any = None) -> Any:
        resp = self._http.request(
            method,
            f"{self.admin_url}{path}",
            json=body,
            headers={"Authorization": f"Bearer {self.admin_token}"},
            timeout=30,
        )
        if resp.status_code >= 400:
            raise RuntimeError(f"sandbox admin {method} {path}: {resp.status_code} {resp.text}")
        return resp.json()

    def seed(self, type: str, id: str | None = None, workspace: str | None = None) -> str:
        """Create one entity (type is an awork path segment: tasks, projects, ...)."""
        item: dict[str, Any] = {"type": type}
        if id is not None:
            item["id"] = id
        if workspace is not None:
            item["workspace"] = workspace
        return str(self.admin("POST", "/entities", item)["created"][0]["id"])

    def seed_many(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return list(self.admin("POST", "/entities", items)["created"])

    def set_faults(self, faults: dict[str, Any]) -> dict[str, Any]:
        return dict(self.admin("POST", "/faults", faults))

    def faults(self) -> dict[str, Any]:
        return dict(self.admin("GET", "/faults"))

    def reset(self, entities: bool = False, faults: bool = False) -> None:
        self.admin("POST", "/reset", {"entities": entities, "faults": faults})

    def stats(self) -> dict[str, Any]:
        return dict(self.admin("GET", "/stats"))

    def oauth_stats(self) -> dict[str, Any]:
        return dict(self.admin("GET", "/oauth"))

    def set_oauth_lifetime(self, seconds: float) -> dict[str, Any]:
        return dict(self.admin("POST", "/oauth", {"access_lifetime_s": seconds}))

    def revoke_grants(self, workspace: str) -> int:
        """What a customer does who removes the integration's access in awork."""
        return int(self.admin("POST", "/oauth/revoke", {"workspace": workspace})["revoked"])
