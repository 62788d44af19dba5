"""`awork-uploads api [--host 127.0.0.1] [--port 8780] [--workers N]`: run the intake on uvicorn."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from producers.config import ConfigError, SharedSettings


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="awork-uploads api", description="Run the HTTP intake.")
    p.add_argument("--host", default="127.0.0.1", help="default: loopback only")
    p.add_argument("--port", type=int, default=8780)
    p.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    p.add_argument("--log-level", default="info")
    p.add_argument("--print-openapi", action="store_true", help="print the OpenAPI document and exit")
    return p


def openapi_document() -> dict[str, object]:
    """The OpenAPI document, without Redis or settings (ops/openapi.json is this, committed)."""
    from producers.intake.app import create_app
    from producers.intake.settings import IntakeSettings

    shared = SharedSettings(
        redis_url="redis://127.0.0.1:6379/0",
        staging_dir=Path("/staging"),
        workspaces_file=None,
        record_ttl_seconds=1,
        source_url_hosts=(),
    )
    return create_app(IntakeSettings(shared=shared, max_body_bytes=1)).openapi()


def app_from_env():  # type: ignore[no-untyped-def]
    """The uvicorn factory: settings read once, at start."""
    from producers.intake.app import create_app
    from producers.intake.settings import IntakeSettings

    return create_app(IntakeSettings.from_env())


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.print_openapi:
        print(json.dumps(openapi_document(), indent=2, sort_keys=True))
        return 0
    try:
        import uvicorn
    except ImportError:
        print(
            "awork-uploads: error: the HTTP API needs the `api` extra: pip install 'awork-uploads[api]'",
            file=sys.stderr,
        )
        return 2
    from producers.intake.settings import IntakeSettings

    try:
        IntakeSettings.from_env()  # a configuration error names its variable before uvicorn starts
    except ConfigError as exc:
        print(f"awork-uploads: error: {exc}", file=sys.stderr)
        return 2
    uvicorn.run(
        "producers.intake.server:app_from_env",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=args.log_level,
        access_log=False,
        proxy_headers=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
