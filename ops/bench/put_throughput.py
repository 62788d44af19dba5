"""PUT benchmark: BlobUploader against `curl -T` to the same endpoint, in one run.

    .venv/bin/python -m ops.bench.put_throughput --sizes 1G,4G --rounds 3   # Azurite (default)
    .venv/bin/python -m ops.bench.put_throughput --target sandbox --latency-ms 50 --window-kib 4096
    .venv/bin/python -m ops.bench.put_throughput --target pkg.mod:factory   # another blob host

For each size it creates a random file under var/bench, then PUTs it four ways, each to a fresh
blob URL: `curl -T` (the streaming baseline, no MD5), BlobUploader forced to one Put Blob (the
MD5 pass beforehand included in the time), the same with the MD5 already known (as when the
producer hashes the file while copying it into staging), BlobUploader with the default block
policy (8 MiB blocks, 4 in flight; MD5s computed while reading), and the same with the block MD5s
already known (`blocks-staged`: staging hashed the blocks too, producers.block_digests; the time
to hash them beforehand is not counted, as for `single-md5-known`).
The uploader runs in a child process so its peak memory growth (VmHWM after the upload minus
VmHWM before it) is its own. Every blob is read back and checked (size and MD5) after the timing.

A `--target` factory is a callable returning a context manager with `allowed_hosts: list[str]`,
`new_url(name) -> str` (a pre-signed upload URL) and `check(name) -> tuple[int, str] | None`
(size and base64 MD5 of the stored blob, or None if it cannot be read back), so the sandbox's
blob host can be measured the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import importlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

REPO = Path(__file__).resolve().parents[2]
BENCH_DIR = REPO / "var" / "bench"
MiB = 1024 * 1024
GiB = 1024 * MiB


class Target(Protocol):
    allowed_hosts: list[str]

    def new_url(self, name: str) -> str: ...

    def check(self, name: str) -> tuple[int, str] | None: ...


class AzuriteTarget:
    """Azurite on a private port, its data under var/bench (deleted afterwards)."""

    container = "bench"

    def __init__(self) -> None:
        from ops.azurite import Azurite

        self.az = Azurite(location=BENCH_DIR / "azurite")
        self.allowed_hosts: list[str] = []

    def __enter__(self) -> AzuriteTarget:
        self.az.start()
        self.az.create_container(self.container)
        self.allowed_hosts = [self.az.host]
        return self

    def __exit__(self, *exc: object) -> None:
        self.az.stop()
        shutil.rmtree(self.az.location, ignore_errors=True)

    def new_url(self, name: str) -> str:
        return self.az.blob_sas_url(self.container, name, permissions="cw", expires_in=6 * 3600)

    def check(self, name: str) -> tuple[int, str] | None:
        return self.az.blob_md5(self.container, name)

    def delete(self, name: str) -> None:
        self.az.delete_blob(self.container, name)


class SandboxTarget:
    """The sandbox's blob host (ops/sandbox): URLs from its POST /files/generateuploadurl.

    `latency_ms` is added by the sandbox to every blob request (its `blob` route fault);
    `window_kib` also paces each request body at that window per round trip, as one TCP stream
    over that latency goes. Blobs are checked through the admin API's stats (size and MD5 of
    the committed bytes) and forgotten after each run, so the disk holds one at a time.
    """

    def __init__(self, latency_ms: float = 0.0, window_kib: float = 0.0) -> None:
        from ops.sandbox.launcher import SandboxProcess

        self.latency_ms = latency_ms
        self.window_kib = window_kib
        self.data_dir = BENCH_DIR / "sandbox"
        self.sb = SandboxProcess(api_keys={"bench-key": "bench"}, data_dir=self.data_dir)
        self.allowed_hosts: list[str] = []
        self._upload_ids: dict[str, str] = {}

    def __enter__(self) -> SandboxTarget:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.sb.start()
        faults: dict[str, Any] = {"window_kib": self.window_kib}
        if self.latency_ms:
            faults["routes"] = {"blob": {"latency_ms": self.latency_ms}}
        self.sb.set_faults(faults)
        self.allowed_hosts = [self.sb.upload_host]
        return self

    def __exit__(self, *exc: object) -> None:
        self.sb.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def new_url(self, name: str) -> str:
        import requests

        r = requests.post(
            f"{self.sb.api_url}/files/generateuploadurl",
            headers={"Authorization": "Bearer bench-key"},
            timeout=30,
        )
        r.raise_for_status()
        body = {k.lower(): v for k, v in r.json().items()}
        self._upload_ids[name] = str(body["uploadid"])
        return str(body["uploadurl"])

    def check(self, name: str) -> tuple[int, str] | None:
        import base64

        up = self.sb.stats()["uploads"].get(self._upload_ids[name])
        if up is None or up["md5"] is None:
            return None
        return int(up["size"]), base64.b64encode(bytes.fromhex(up["md5"])).decode()

    def delete(self, name: str) -> None:
        self._upload_ids.pop(name, None)
        self.sb.reset()


class ThrottleProxy:
    """A loopback TCP proxy that caps each connection's upload rate (client -> server).

    Models what a WAN does to one TCP connection (its window over the round trip), which is
    why Azure's SDK uploads blocks in parallel: on bare loopback one connection is never the
    bottleneck, so blocks in flight cannot show their worth there.
    """

    def __init__(self, upstream: str, mib_per_s: float) -> None:
        host, _, port = upstream.rpartition(":")
        self.upstream = (host, int(port))
        self.rate = mib_per_s * MiB
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="throttle-proxy")

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        server.close()

    async def _pipe(self, r: asyncio.StreamReader, w: asyncio.StreamWriter, rate: float | None) -> None:
        loop = asyncio.get_running_loop()
        next_free = loop.time()
        try:
            while data := await r.read(256 * 1024):
                w.write(data)
                await w.drain()
                if rate:
                    next_free = max(next_free, loop.time()) + len(data) / rate
                    delay = next_free - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
        except (ConnectionError, OSError):
            pass
        finally:
            w.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            return
        await asyncio.gather(self._pipe(reader, up_w, self.rate), self._pipe(up_r, writer, None))

    def start(self) -> ThrottleProxy:
        self._thread.start()
        self._ready.wait(10)
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


class ThrottledTarget:
    """Any target behind a ThrottleProxy: URLs point at the proxy (a SAS signs the path only)."""

    def __init__(self, inner: Target, mib_per_s: float) -> None:
        self.inner = inner
        self.proxy = ThrottleProxy(inner.allowed_hosts[0], mib_per_s).start()
        self.allowed_hosts = [self.proxy.host]

    def new_url(self, name: str) -> str:
        parts = urlsplit(self.inner.new_url(name))
        return urlunsplit(parts._replace(netloc=self.proxy.host))

    def check(self, name: str) -> tuple[int, str] | None:
        return self.inner.check(name)

    def delete(self, name: str) -> None:
        delete = getattr(self.inner, "delete", None)
        if delete is not None:
            delete(name)


def _make_file(path: Path, size: int) -> None:
    chunk = os.urandom(16 * MiB)  # random, so nothing on the way can compress it
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(left, len(chunk))
            f.write(chunk[:n])
            left -= n
            # vary the content between chunks cheaply: every block's MD5 differs
            chunk = chunk[1:] + chunk[:1]


def _vm_hwm_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def _staged_source(path: Path, policy: Any) -> Any:
    from producers.block_digests import BlockDigests, BlockHasher, block_size_for
    from workers.sources import FileSource

    size = path.stat().st_size
    hasher = BlockHasher(block_size_for(size, policy.block_size))
    whole = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MiB):
            hasher.update(chunk)
            whole.update(chunk)
    md5 = base64.b64encode(whole.digest()).decode()
    return FileSource(path, md5, BlockDigests(size, hasher.block_size, md5, hasher.finish()))


def child_main(argv: list[str]) -> None:
    """Runs in the child: one upload, JSON on stdout."""
    url, path, mode, hosts = argv[0], argv[1], argv[2], argv[3].split(",")
    from workers.blob import BlobUploader, TransferPolicy
    from workers.sources import FileSource, file_md5_b64

    size = Path(path).stat().st_size
    if mode.startswith("single"):
        policy = TransferPolicy(single_put_threshold=max(size, 1))
    elif mode == "blocks-1":
        policy = TransferPolicy(single_put_threshold=0, parallel_blocks=1)
    else:
        policy = TransferPolicy(single_put_threshold=0)
    up = BlobUploader(hosts, policy)
    source = FileSource(path)
    if mode == "single-md5-known":
        # As when the producer hashed the file in the same pass that copied it into staging.
        source = FileSource(path, md5_b64=file_md5_b64(path))
    elif mode == "blocks-staged":
        # As when staging also hashed the blocks (producers.block_digests): the worker hashes nothing.
        source = _staged_source(Path(path), policy)
    before = _vm_hwm_kib()
    t0 = time.perf_counter()
    out = up.upload(url, source, content_type="application/octet-stream")
    seconds = time.perf_counter() - t0
    after = _vm_hwm_kib()
    up.close()
    print(
        json.dumps(
            {
                "seconds": seconds,
                "hwm_before_kib": before,
                "hwm_after_kib": after,
                "mode": out.mode,
                "blocks": out.blocks_sent,
                "md5": out.md5_b64,
            }
        )
    )


def _curl(url: str, path: Path) -> float:
    args = [
        "curl", "-sS", "-f", "-T", str(path),
        "-H", "x-ms-blob-type: BlockBlob",
        "-H", "Expect:",  # no 100-continue round trip (up to 1 s of waiting on some servers)
        "-H", "Content-Type: application/octet-stream",
        "-o", "/dev/null", url,
    ]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(args, check=True)
    return time.perf_counter() - t0


def _uploader(url: str, path: Path, mode: str, hosts: list[str]) -> dict[str, Any]:
    args = [
        sys.executable,
        "-m",
        "ops.bench.put_throughput",
        "--child",
        url,
        str(path),
        mode,
        ",".join(hosts),
    ]
    done = subprocess.run(args, cwd=REPO, check=True, capture_output=True, text=True)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _parse_size(text: str) -> int:
    text = text.strip().upper()
    units = {"G": GiB, "M": MiB, "K": 1024}
    if text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


@contextlib.contextmanager
def _target(spec: str, latency_ms: float, window_kib: float, per_connection_mibps: float) -> Iterator[Target]:
    with contextlib.ExitStack() as stack:
        target: Target
        if spec == "azurite":
            target = stack.enter_context(AzuriteTarget())
        elif spec == "sandbox":
            target = stack.enter_context(SandboxTarget(latency_ms, window_kib))
        else:
            module, _, attr = spec.partition(":")
            target = stack.enter_context(getattr(importlib.import_module(module), attr)())
        if per_connection_mibps:
            throttled = ThrottledTarget(target, per_connection_mibps)
            stack.callback(throttled.proxy.stop)
            target = throttled
        yield target


def _run_once(target: Target, path: Path, size: int, method: str, tag: str, verify: bool) -> dict[str, Any]:
    name = f"{method}-{size}-{tag}"
    if method == "curl":
        r: dict[str, Any] = {"seconds": _curl(target.new_url(name), path)}
    else:
        r = _uploader(target.new_url(name), path, method, target.allowed_hosts)
        r["peak_growth_MiB"] = (r["hwm_after_kib"] - r["hwm_before_kib"]) / 1024
    if verify:
        got = target.check(name)
        if got is not None:
            assert got[0] == size, f"{method}: stored {got[0]} bytes of {size}"
            if "md5" in r:
                assert got[1] == r["md5"], f"{method}: MD5 differs"
            r["verified"] = True
    delete = getattr(target, "delete", None)
    if delete is not None:
        delete(name)  # keep the disk footprint to one blob
    return r


METHODS = {
    "curl": "curl -T",
    "single": "put_file single",
    "single-md5-known": "put_file single, MD5 known",
    "blocks": "put_file blocks 8MiBx4",
    "blocks-staged": "put_file blocks, MD5s staged",
    "blocks-1": "put_file blocks 8MiBx1",
}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_main(sys.argv[2:])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1G,4G", help="comma-separated, e.g. 1G,4G or 256M")
    p.add_argument("--target", default="azurite", help="azurite, sandbox, or module:factory")
    p.add_argument("--latency-ms", type=float, default=0.0, help="sandbox: latency per blob request")
    p.add_argument(
        "--window-kib",
        type=float,
        default=0.0,
        help="sandbox: with --latency-ms, pace each body at this much per round trip (one TCP stream)",
    )
    p.add_argument(
        "--per-connection-mibps",
        type=float,
        default=0.0,
        help="cap each TCP connection's upload rate with a loopback proxy (models a WAN)",
    )
    p.add_argument(
        "--methods", default="curl,single,single-md5-known,blocks", help=f"any of {','.join(METHODS)}"
    )
    p.add_argument("--rounds", type=int, default=1, help="interleaved rounds (median and best reported)")
    p.add_argument("--no-verify", action="store_true", help="skip reading every blob back")
    args = p.parse_args()

    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    rows = []
    print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs", flush=True)
    with _target(args.target, args.latency_ms, args.window_kib, args.per_connection_mibps) as target:
        for size in (_parse_size(s) for s in args.sizes.split(",")):
            path = BENCH_DIR / f"bench-{size}.bin"
            try:
                _make_file(path, size)
                label = f"{size / GiB:g} GiB" if size >= GiB else f"{size / MiB:g} MiB"
                methods = [m for m in args.methods.split(",") if m]
                runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
                for round_ in range(args.rounds):  # interleaved: machine noise hits every method
                    for method in methods:
                        runs[method].append(
                            _run_once(target, path, size, method, str(round_), not args.no_verify)
                        )
                summary = {}
                for method, rs in runs.items():
                    secs = sorted(r["seconds"] for r in rs)
                    summary[method] = {
                        "median_s": statistics.median(secs),
                        "best_s": secs[0],
                        "peak_growth_MiB": max((r.get("peak_growth_MiB", 0.0) for r in rs), default=0.0),
                        "verified": all(r.get("verified") for r in rs),
                        "blocks": rs[0].get("blocks", 0),
                    }
                base = summary.get("curl") or next(iter(summary.values()))
                for method, m in summary.items():
                    rate = size / MiB / m["median_s"]
                    print(
                        f"{label:>8}  {METHODS[method]:<27} median {m['median_s']:7.2f} s "
                        f"({rate:6.1f} MiB/s, ratio {base['median_s'] / m['median_s']:4.2f})"
                        f"  best {m['best_s']:6.2f} s (ratio {base['best_s'] / m['best_s']:4.2f})"
                        + (f"  peak +{m['peak_growth_MiB']:.1f} MiB" if method != "curl" else "")
                        + (f"  {m['blocks']} blocks" if m["blocks"] else "")
                        + ("  verified" if m["verified"] else ""),
                        flush=True,
                    )
                rows.append({"size": size, "rounds": args.rounds, "summary": summary, "runs": runs})
            finally:
                path.unlink(missing_ok=True)
    print(f"load average at end: {os.getloadavg()[0]:.2f}", flush=True)
    out = BENCH_DIR / "put_throughput.json"
    out.write_text(json.dumps(rows, indent=2))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
