"""`awork-uploads api [--host 127.0.0.1] [--port 8780] [--workers N]`: run the intake on uvicorn."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from producers.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="awork-uploads api", description="Run the HTTP intake.")
    p.add_argument("--host", default="127.0.0.1", help="default: loopback only")
    p.add_argument("--port", type=int, default=8780)
    p.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    p.add_argument("--log-level", default="info")
    return p


def app_from_env():  # type: ignore[no-untyped-def]
    """The uvicorn factory: settings read once, at start."""
    from producers.intake.app import create_app
    from producers.intake.settings import IntakeSettings

    return create_app(IntakeSettings.from_env())


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
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
