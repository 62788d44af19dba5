"""Where the API key may travel: AWORK_API_URL (and a workspace's `api_url`) must be https.

Every API request carries the workspace's key in its Authorization header, so a plain http://
URL off this machine would send the key in clear text to whoever is on the path. Loopback
(127.0.0.0/8, ::1, localhost: the sandbox, a local TLS-terminating proxy) is allowed, and so is
any http:// URL when AWORK_ALLOW_INSECURE_API=1: an explicit opt-in for a lab network.
"""

from __future__ import annotations

import ipaddress
import os
from urllib.parse import urlsplit

from producers.config import DEFAULT_API_URL, ConfigError, env_flag, redact_url

ALLOW_INSECURE_ENV = "AWORK_ALLOW_INSECURE_API"


def insecure_api_allowed() -> bool:
    """AWORK_ALLOW_INSECURE_API, read once at start by the worker settings."""
    return env_flag(ALLOW_INSECURE_ENV)


def api_url_from_env(allow_insecure: bool) -> str:
    """AWORK_API_URL (awork's by default), checked: the workers and the `connections` commands
    both send keys and tokens there, so both hold it to the same rule."""
    url = os.environ.get("AWORK_API_URL", "").strip() or DEFAULT_API_URL
    check_api_url("AWORK_API_URL", url, allow_insecure)
    return url.rstrip("/")


def is_loopback_host(host: str) -> bool:
    """localhost, 127.0.0.0/8 or ::1 (a host name other than localhost is never assumed local)."""
    host = host.strip().strip("[]").rstrip(".").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_api_url(name: str, url: str, allow_insecure: bool) -> None:
    """ConfigError naming `name` unless `url` is https, http to loopback, or insecure is allowed."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{name}: expected an http(s) URL, got {redact_url(url)!r}")
    if parts.scheme == "http" and not allow_insecure and not is_loopback_host(parts.hostname):
        raise ConfigError(
            f"{name}: http:// to {parts.hostname} would send the API key in clear text; use https:// "
            f"(http is allowed to loopback only, or everywhere with {ALLOW_INSECURE_ENV}=1)"
        )
