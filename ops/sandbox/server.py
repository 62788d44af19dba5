"""Run the sandbox: two listeners (API + admin, blob host) on aiohttp's low-level server.

The low-level server skips aiohttp's Application router and middleware chain: the sandbox
does its own (case-insensitive) routing, and every microsecond per request is headroom for
the benchmarks the sandbox must never be the bottleneck of.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import sys
from collections.abc import Callable

from aiohttp import web

from . import errors as E
from .admin import AdminApi
from .app import ApiFrontDoor
from .blob import BlobHost
from .core import Sandbox
from .routing import API_PREFIX

READ_BUFSIZE = 1 << 20  # aiohttp pauses the socket past twice this: bounds memory per upload


def _api_handler(sandbox: Sandbox) -> Callable[[web.BaseRequest], object]:
    api = ApiFrontDoor(sandbox)
    admin = AdminApi(sandbox)
    prefix = API_PREFIX.lower()
    plen = len(prefix)

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        path = request.path
        head = path[:plen].lower()
        if head == prefix and (len(path) == plen or path[plen] == "/"):
            return await api.handle(request, path[plen:])
        if path[:9].lower() == "/_sandbox":
            return await admin.handle(request, path[9:])
        trace_id = secrets.token_hex(16)
        return web.Response(
            status=404, body=E.NO_ROUTE.body(trace_id), content_type="application/json",
            headers={"Trace-Id": trace_id},
        )

    return handle


def _public(host: str, public_host: str | None) -> str:
    if public_host:
        return public_host
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


async def serve(sandbox: Sandbox, ready: Callable[[Sandbox], None] | None = None) -> None:
    """Bind, print the ready lines (via `ready`), run until SIGINT/SIGTERM, clean up."""
    cfg = sandbox.config
    kwargs = {"read_bufsize": READ_BUFSIZE, "access_log": None, "lingering_time": 10.0}
    if cfg.access_log:
        kwargs.pop("access_log")
    api_server = web.Server(_api_handler(sandbox), **kwargs)  # type: ignore[arg-type]
    blob_host = BlobHost(sandbox)
    blob_server = web.Server(blob_host.handle, **kwargs)  # type: ignore[arg-type]
    runners = [web.ServerRunner(api_server, shutdown_timeout=2.0),
               web.ServerRunner(blob_server, shutdown_timeout=2.0)]
    for r in runners:
        await r.setup()
    api_site = web.TCPSite(runners[0], cfg.host, cfg.port, backlog=1024)
    await api_site.start()
    api_port = _bound_port(runners[0])
    blob_port = cfg.blob_port if cfg.blob_port is not None else (api_port + 1 if cfg.port else 0)
    blob_site = web.TCPSite(runners[1], cfg.host, blob_port, backlog=1024)
    await blob_site.start()
    blob_port = _bound_port(runners[1])
    host = _public(cfg.host, cfg.public_host)
    sandbox.api_base = f"http://{host}:{api_port}{API_PREFIX}"
    sandbox.blob_base = f"http://{host}:{blob_port}"
    sandbox.admin_base = f"http://{host}:{api_port}/_sandbox"

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        if ready is not None:
            ready(sandbox)
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        for r in runners:
            await r.cleanup()


def _bound_port(runner: web.BaseRunner) -> int:
    for addr in runner.addresses:
        if isinstance(addr, tuple):
            return int(addr[1])
    raise RuntimeError("the sandbox did not bind a TCP port")


def print_ready(sandbox: Sandbox, entities: dict[str, list[str]] | None,
                extra: list[str]) -> None:
    host_port = sandbox.blob_base.removeprefix("http://")
    lines = [
        f"AWORK_API_URL={sandbox.api_base}",
        f"AWORK_UPLOAD_HOSTS={host_port}",
        f"SANDBOX_ADMIN_URL={sandbox.admin_base}",
        *extra,
    ]
    if entities is not None:
        lines.append(f"SANDBOX_ENTITIES={json.dumps(entities)}")
    lines.append("SANDBOX_READY=1")
    sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.flush()
