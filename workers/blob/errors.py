"""How the upload host's answers and transport failures are read: retry, refresh, fall back, fail."""

from __future__ import annotations

import re
from typing import Any

import requests

from workers.errors import AworkError, PermanentError, TransientError, UploadUrlExpired

# 403 codes that mean "this SAS is no good any more" (Azure; Azurite's spelling): get a new URL.
EXPIRY_CODES = frozenset({"AuthenticationFailed", "AuthorizationFailure"})
# Codes with which a host says "no Put Block / Put Block List here" (not an expiry).
BLOCK_REFUSAL_CODES = frozenset(
    {
        "InvalidQueryParameterValue",
        "UnsupportedQueryParameter",
        "UnsupportedHeader",
        "UnsupportedHttpVerb",
        "FeatureNotSupported",
        "NotImplemented",
        "OperationNotAllowedOnTheBlobType",
    }
)
BLOCK_REFUSAL_STATUSES = frozenset({405, 501})

# Failures on the way (no answer read): worth another attempt.
TRANSIENT_EXC: tuple[type[BaseException], ...] = (
    requests.exceptions.ConnectionError,
    requests.exceptions.Timeout,
    requests.exceptions.ChunkedEncodingError,
    requests.exceptions.ContentDecodingError,
)

_CODE_RE = re.compile(rb"<Code>\s*([^<\s]+)\s*</Code>")


class BlocksRefused(AworkError):
    """The host does not do Put Block / Put Block List: fall back to one Put Blob."""


class BlocksLost(AworkError):
    """Put Block List names blocks the server no longer has: forget the journal and resend."""


class Aborted(Exception):
    """Another block failed for good: this one stops quietly."""


def error_from(resp: requests.Response, op: str) -> AworkError:
    """Classify a non-2xx answer of the upload host to `op` (put-blob, put-block, put-block-list)."""
    status = resp.status_code
    body = resp.content[:8192] if resp.content else b""
    code = resp.headers.get("x-ms-error-code")
    if not code:
        m = _CODE_RE.search(body)
        code = m.group(1).decode(errors="replace") if m else None
    trace = resp.headers.get("x-ms-request-id")
    msg = f"{op}: upload host answered {status}" + (f" {code}" if code else "")
    kwargs: dict[str, Any] = {"status": status, "code": code, "trace_id": trace}
    if status == 403 and code in EXPIRY_CODES:
        return UploadUrlExpired(msg, **kwargs)
    if op in ("put-block", "put-block-list") and (
        status in BLOCK_REFUSAL_STATUSES
        or (status == 400 and code in BLOCK_REFUSAL_CODES)
        or (status == 403 and code == "AuthorizationPermissionMismatch")
    ):
        return BlocksRefused(msg, **kwargs)
    if status == 400 and code == "Md5Mismatch":
        return TransientError(msg + " (corrupted in flight)", **kwargs)
    if op == "put-block-list" and status == 400 and code == "InvalidBlockList":
        return BlocksLost(msg, **kwargs)
    if status in (408, 429) or status >= 500:
        retry_after = resp.headers.get("Retry-After")
        delay = float(retry_after) if retry_after and retry_after.isdigit() else None
        return TransientError(msg, retry_after=delay, **kwargs)
    return PermanentError(msg, **kwargs)
