"""Error texts without credentials: what goes into job records, Celery events and Flower.

requests' exception texts carry the whole URL (`... with url: /c/b?sv=...&sig=...`), and an
upload URL or a signed source URL is a credential. So transport errors are described by the
host and the exception class only (`transport_error`), and every error text a record gets passes
`scrub`, which cuts every URL down to its scheme and host and masks what the log filter masks.
"""

from __future__ import annotations

import re

from workers.logging_setup import redact
from workers.url_source import redact_url

# scheme://anything-up-to-whitespace-or-quote (a URL inside a longer text)
_URL = re.compile(r"(?i)\b[a-z][a-z0-9+.-]*://[^\s\"'<>]+")
# requests/urllib3's "with url: /path?query" and "url: /path" fragments
_URL_PATH = re.compile(r"(?i)(\burl:\s*)\S+")
# any remaining query string that holds a signature or a token
_QUERY = re.compile(r"\?[^\s\"'<>]*(?:sig|signature|token|key|credential)[^\s\"'<>]*", re.IGNORECASE)
MAX_LENGTH = 2000


def scrub(text: str) -> str:
    """`text` with every URL cut to scheme://host:port and credentials masked; bounded length."""
    text = _URL.sub(lambda m: redact_url(m.group(0)), text)
    text = _URL_PATH.sub(r"\1<redacted>", text)
    text = _QUERY.sub("?<redacted>", text)
    text = redact(text)
    return text if len(text) <= MAX_LENGTH else text[: MAX_LENGTH - 3] + "..."


def transport_error(op: str, exc: BaseException, url: str) -> str:
    """`op: ConnectionError talking to http://host:port`: the exception's text is left out."""
    return f"{op}: {type(exc).__name__} talking to {redact_url(url)}"


__all__ = ["scrub", "transport_error"]
