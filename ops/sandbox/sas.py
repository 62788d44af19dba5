"""Upload URLs in Azure's service-SAS shape, signed with an HMAC only this process knows.

The signature covers the path and every query field except `sig` and the operation
parameters Azure leaves unsigned (comp, blockid, blocklisttype, timeout), so changing the
expiry, the permissions or the blob name is detected as tampering.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
from collections.abc import Mapping
from datetime import UTC, datetime
from urllib.parse import quote

from .errors import auth_failed

SAS_VERSION = "2024-11-04"
UNSIGNED_PARAMS = frozenset({"sig", "comp", "blockid", "blocklisttype", "timeout"})
_SE_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


_se_cache: dict[int, str] = {}


def format_se(ts: float) -> str:
    """ISO 8601 UTC to the second; cached, as every URL of a second shares it."""
    sec = int(ts)
    text = _se_cache.get(sec)
    if text is None:
        if len(_se_cache) > 64:
            _se_cache.clear()
        text = _se_cache[sec] = datetime.fromtimestamp(sec, UTC).strftime(_SE_FORMAT)
    return text


def parse_sas_time(text: str) -> float:
    """Azure accepts ISO 8601 UTC with or without seconds and with fractions."""
    for fmt in (_SE_FORMAT, "%Y-%m-%dT%H:%M:%S.%fZ", "%Y-%m-%dT%H:%MZ", "%Y-%m-%d"):
        try:
            return datetime.strptime(text, fmt).replace(tzinfo=UTC).timestamp()
        except ValueError:
            continue
    raise ValueError(text)


class Signer:
    def __init__(self, key: bytes) -> None:
        self._mac = hmac.new(key, digestmod=hashlib.sha256)  # copied per use: cheaper than new

    def _sig(self, path: str, fields: Mapping[str, str]) -> str:
        signed = "\n".join(
            [path, *(f"{k}={fields[k]}" for k in sorted(fields) if k not in UNSIGNED_PARAMS)]
        )
        mac = self._mac.copy()
        mac.update(signed.encode())
        return base64.b64encode(mac.digest()).decode()

    def sign_query(self, path: str, permissions: str, expires_at: float) -> str:
        """The query string of an upload URL for `path`, valid until `expires_at` (ceil)."""
        fields = {
            "sv": SAS_VERSION,
            "sr": "b",
            "sp": permissions,
            "se": format_se(math.ceil(expires_at)),
        }
        sig = self._sig(path, fields)
        return (
            f"sv={SAS_VERSION}&sr=b&sp={quote(permissions, safe='')}"
            f"&se={fields['se'].replace(':', '%3A')}"
            f"&sig={sig.replace('+', '%2B').replace('/', '%2F').replace('=', '%3D')}"
        )

    def verify(self, path: str, query: Mapping[str, str], now: float) -> str:
        """Check signature, validity window and resource type; returns the permissions.

        Raises BlobError 403 AuthenticationFailed, with Azure's detail text.
        """
        sig = query.get("sig")
        if not sig:
            raise auth_failed("Signature (sig) is missing: this sandbox only accepts SAS URLs.")
        fields = {k: v for k, v in query.items() if k not in UNSIGNED_PARAMS}
        expected = self._sig(path, fields)
        if not hmac.compare_digest(expected.encode(), sig.encode()):
            raise auth_failed(
                f"Signature did not match. String to sign used was {path} with the query's "
                "signed fields."
            )
        se = fields.get("se")
        if se is None:
            raise auth_failed("Signed expiry (se) is missing.")
        try:
            expiry = parse_sas_time(se)
        except ValueError:
            raise auth_failed(f"Signed expiry time [{se}] is not a valid time.") from None
        if now > expiry:
            raise auth_failed(
                f"Signed expiry time [{_http_date(expiry)}] must be after signed start time "
                f"[{_http_date(now)}]"
            )
        st = fields.get("st")
        if st is not None:
            try:
                start = parse_sas_time(st)
            except ValueError:
                raise auth_failed(f"Signed start time [{st}] is not a valid time.") from None
            if now < start:
                raise auth_failed(f"Signed start time [{_http_date(start)}] is in the future")
        if fields.get("sr") != "b":
            raise auth_failed("Signed resource (sr) must be b for a blob.")
        return fields.get("sp", "")


def _http_date(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%a, %d %b %Y %H:%M:%S GMT")
