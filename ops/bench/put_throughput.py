"""PUT benchmark: BlobUploader against `curl -T` to the same endpoint, in one run.

    .venv/bin/python -m ops.bench.put_throughput --sizes 1G,4G            # Azurite (default)
    .venv/bin/python -m ops.bench.put_throughput --target pkg.mod:factory # another blob host

For each size it creates a random file under var/bench, then PUTs it four ways, each to a fresh
blob URL: `curl -T` (the streaming baseline, no MD5), BlobUploader forced to one Put Blob (the
MD5 pass beforehand included in the time), the same with the MD5 already known (as when the
producer hashes the file while copying it into staging), and BlobUploader with the default block
policy (8 MiB blocks, 4 in flight; MD5s computed while reading).
The uploader runs in a child process so its peak memory growth (VmHWM after the upload minus
VmHWM before it) is its own. Every blob is read back and checked (size and MD5) after the timing.

A `--target` factory is a callable returning a context manager with `allowed_hosts: list[str]`,
`new_url(name) -> str` (a pre-signed upload URL) and `check(name) -> tuple[int, str] | None`
(size and base64 MD5 of the stored blob, or None if it cannot be read back), so the sandbox's
blob host can be measured the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

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


def child_main(argv: list[str]) -> None:
    """Runs in the child: one upload, JSON on stdout."""
    url, path, mode, hosts = argv[0], argv[1], argv[2], argv[3].split(",")
    from workers.blob import BlobUploader, TransferPolicy
    from workers.sources import FileSource, file_md5_b64

    size = Path(path).stat().st_size
    if mode.startswith("single"):
        policy = TransferPolicy(single_put_threshold=max(size, 1))
    else:
        policy = TransferPolicy(single_put_threshold=0)
    up = BlobUploader(hosts, policy)
    source = FileSource(path)
    if mode == "single-md5-known":
        # As when the producer hashed the file in the same pass that copied it into staging.
        source = FileSource(path, md5_b64=file_md5_b64(path))
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
def _target(spec: str) -> Iterator[Target]:
    if spec == "azurite":
        with AzuriteTarget() as t:
            yield t
        return
    module, _, attr = spec.partition(":")
    factory = getattr(importlib.import_module(module), attr)
    with factory() as t:
        yield t


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_main(sys.argv[2:])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1G,4G", help="comma-separated, e.g. 1G,4G or 256M")
    p.add_argument("--target", default="azurite", help="azurite, or module:factory")
    p.add_argument("--no-verify", action="store_true", help="skip reading every blob back")
    args = p.parse_args()

    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    rows = []
    with _target(args.target) as target:
        for size in (_parse_size(s) for s in args.sizes.split(",")):
            path = BENCH_DIR / f"bench-{size}.bin"
            try:
                _make_file(path, size)
                label = f"{size / GiB:g} GiB" if size >= GiB else f"{size / MiB:g} MiB"
                runs: dict[str, dict[str, Any]] = {}
                name = f"curl-{size}"
                runs["curl -T"] = {"seconds": _curl(target.new_url(name), path), "blob": name}
                for mode in ("single", "single-md5-known", "blocks"):
                    name = f"{mode}-{size}"
                    r = _uploader(target.new_url(name), path, mode, target.allowed_hosts)
                    r["blob"] = name
                    runs[f"put_file {mode}"] = r
                for what, r in runs.items():
                    r["MiB/s"] = size / MiB / r["seconds"]
                    if "hwm_after_kib" in r:
                        r["peak_growth_MiB"] = (r["hwm_after_kib"] - r["hwm_before_kib"]) / 1024
                    if not args.no_verify:
                        got = target.check(r["blob"])
                        if got is not None:
                            assert got[0] == size, f"{what}: stored {got[0]} bytes of {size}"
                            if "md5" in r:
                                assert got[1] == r["md5"], f"{what}: MD5 differs"
                            r["verified"] = True
                    if hasattr(target, "delete"):
                        target.delete(r["blob"])  # keep the disk footprint to one blob
                base = runs["curl -T"]["MiB/s"]
                for what, r in runs.items():
                    print(
                        f"{label:>8}  {what:<26} {r['seconds']:7.2f} s  {r['MiB/s']:8.1f} MiB/s  "
                        f"ratio {r['MiB/s'] / base:5.2f}"
                        + (f"  peak +{r['peak_growth_MiB']:.1f} MiB" if "peak_growth_MiB" in r else "")
                        + (f"  ({r['blocks']} blocks)" if r.get("blocks") else "")
                        + ("  verified" if r.get("verified") else ""),
                        flush=True,
                    )
                rows.append({"size": size, "runs": runs})
            finally:
                path.unlink(missing_ok=True)
    out = BENCH_DIR / "put_throughput.json"
    out.write_text(json.dumps(rows, indent=2))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
