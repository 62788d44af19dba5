"""A small awork API client: one requests Session per thread, explicit timeouts, classified errors.

Every response (success or error) is passed to `on_response` so the rate limiter can learn from
awork's headers. Errors keep awork's code, description and trace id for the job record.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

import requests

from workers.errors import AworkError, PermanentError, RateLimited, TransientError
from workers.settings import Secret

# (status, headers, seconds the request took)
ResponseHook = Callable[[int, Mapping[str, str], float], None]
# The bearer token for the next request: a fixed API key, or an OAuth connection's current token.
TokenSource = Secret | Callable[[], Secret]
# Called with the token awork answered 401 to; returns a fresh one to retry once with, or None.
Unauthorized = Callable[[Secret], Secret | None]
# awork codes that say "try again" although they come with a 4xx status.
RETRYABLE_CODES = frozenset({"concurrency-violation", "database-commit"})
USER_AGENT = "awork-uploads/0.1"


class AworkClient:
    def __init__(
        self,
        api_url: str,
        api_key: TokenSource,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        on_response: ResponseHook | None = None,
        on_unauthorized: Unauthorized | None = None,
    ) -> None:
        self.api_url = api_url.rstrip("/")
        self._api_key = api_key
        self.on_unauthorized = on_unauthorized
        self.timeout = (connect_timeout, read_timeout)
        self.on_response = on_response
        self._local = threading.local()

    @property
    def session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.trust_env = False
            session.headers["User-Agent"] = USER_AGENT
            self._local.session = session
        return session

    # -- the calls ---------------------------------------------------------------------------
    def generate_upload_url(self) -> tuple[str, str]:
        """POST /files/generateuploadurl -> (uploadId, uploadURL); the key is read case-insensitively."""
        body = self._request("POST", "/files/generateuploadurl")
        fields = {k.lower(): v for k, v in body.items()} if isinstance(body, dict) else {}
        upload_id, upload_url = fields.get("uploadid"), fields.get("uploadurl")
        if not upload_id or not upload_url:
            raise TransientError("generateuploadurl answered without uploadId/uploadURL")
        return str(upload_id), str(upload_url)

    def link_upload(
        self, path: str, upload_id: str, file_name: str, description: str | None
    ) -> dict[str, Any]:
        body = {"uploadId": upload_id, "fileName": file_name, "description": description}
        result = self._request("POST", path, json=body)
        return result if isinstance(result, dict) else {}

    def add_file_by_url(self, path: str, url: str, name: str, description: str | None) -> dict[str, Any]:
        """POST .../files/byurl: awork fetches `url` itself (FilePostForm)."""
        body = {"url": url, "name": name, "description": description}
        result = self._request("POST", path, json=body)
        return result if isinstance(result, dict) else {}

    def multipart_upload(
        self, path: str, body: Any, content_type: str, content_length: int | None
    ) -> dict[str, Any]:
        headers = {"Content-Type": content_type}
        if content_length is not None:
            headers["Content-Length"] = str(content_length)
        result = self._request("POST", path, data=body, headers=headers)
        return result if isinstance(result, dict) else {}

    def list_files(
        self,
        path: str,
        page_size: int = 1000,
        max_pages: int = 50,
        before_each: Callable[[], None] | None = None,
    ) -> list[dict[str, Any]]:
        """Every FileInfo of an entity, page by page; `before_each` runs before every request
        (the caller's rate token: each page is a request to awork)."""
        out: list[dict[str, Any]] = []
        for page in range(1, max_pages + 1):
            if before_each is not None:
                before_each()
            batch = self._request("GET", path, params={"page": page, "pageSize": page_size})
            if not isinstance(batch, list):
                break
            out.extend(b for b in batch if isinstance(b, dict))
            if len(batch) < page_size:
                break
        return out

    # -- plumbing ----------------------------------------------------------------------------
    def _token(self) -> Secret:
        key = self._api_key
        return key if isinstance(key, Secret) else key()

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        token = self._token()
        resp = self._send(method, path, token, kwargs)
        if resp.status_code == 401 and self.on_unauthorized is not None:
            # An OAuth token awork no longer takes (revoked, or lapsed in flight): the request had
            # no effect, so it is sent once more with a fresh token (or NeedsReconnect parks it).
            fresh = self.on_unauthorized(token)
            if fresh is not None and fresh.reveal() != token.reveal():
                if not _replayable(kwargs):  # a streamed body: the step's retry sends it again
                    raise TransientError(f"{method} {path}: token refreshed after a 401", status=401)
                resp = self._send(method, path, fresh, kwargs)
        if resp.status_code < 300:
            if not resp.content:
                return None
            try:
                return resp.json()
            except ValueError:
                raise TransientError(
                    f"{method} {path}: answer is not JSON", status=resp.status_code
                ) from None
        raise classify(method, path, resp)

    def _send(self, method: str, path: str, token: Secret, kwargs: dict[str, Any]) -> requests.Response:
        url = f"{self.api_url}{path}"
        headers = {**(kwargs.get("headers") or {}), "Authorization": f"Bearer {token.reveal()}"}
        rest = {k: v for k, v in kwargs.items() if k != "headers"}
        try:
            resp = self.session.request(method, url, timeout=self.timeout, headers=headers, **rest)
        except requests.exceptions.ConnectTimeout as exc:
            raise TransientError(f"{method} {path}: connect timeout ({type(exc).__name__})") from None
        except requests.exceptions.ReadTimeout:
            raise TransientError(f"{method} {path}: read timeout") from None
        except requests.exceptions.RequestException as exc:
            # The request may have reached awork before the connection broke.
            raise TransientError(f"{method} {path}: connection error ({type(exc).__name__})") from None
        if self.on_response is not None:
            self.on_response(resp.status_code, resp.headers, resp.elapsed.total_seconds())
        return resp


def _replayable(kwargs: dict[str, Any]) -> bool:
    """A streamed body (multipart upload) cannot be sent twice."""
    data = kwargs.get("data")
    return data is None or isinstance(data, bytes | str | dict)


def classify(method: str, path: str, resp: requests.Response) -> AworkError:
    """Map an error response to Permanent, Transient or RateLimited, keeping awork's details."""
    status = resp.status_code
    code = description = None
    details: list[str] = []
    trace_id = resp.headers.get("Trace-Id") or resp.headers.get("traceparent")
    try:
        body = resp.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        code = body.get("code")
        description = body.get("description")
        trace_id = trace_id or body.get("traceId")
        details = [str(d) for d in body.get("details") or []]
        for v in body.get("validationErrors") or []:
            if isinstance(v, dict):
                details.append(f"{v.get('property')}: {v.get('message')}")
    message = f"{method} {path}: {description or resp.reason or 'HTTP ' + str(status)}"
    kw: dict[str, Any] = {"status": status, "code": code, "trace_id": trace_id, "details": details}
    if status == 429:
        return RateLimited(message, retry_after=_retry_after(resp.headers), **kw)
    if status >= 500 or status in (408, 409) or code in RETRYABLE_CODES:
        return TransientError(message, retry_after=_retry_after(resp.headers), **kw)
    return PermanentError(message, **kw)


def _retry_after(headers: Mapping[str, str]) -> float | None:
    for name in ("Retry-After", "ratelimit-reset"):
        raw = headers.get(name)
        if raw:
            try:
                return max(0.0, float(raw))
            except ValueError:
                continue
    return None
