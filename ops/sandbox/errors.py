"""Error bodies in the two dialects clients must parse: awork's JSON and Azure Blob's XML.

Handlers raise `ApiError` / `BlobError`; the dispatchers turn them into responses, so every
error leaves the sandbox in exactly one shape per host.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from xml.sax.saxutils import escape

AWORK_DOCS_LINK = "https://developers.awork.com"

# awork error codes used by the sandbox (see ops/sandbox/README.md for when each is sent).
NOT_FOUND = "not-found"
VALIDATION_FAILED = "validation-failed"
INVALID_OPERATION = "invalid-operation"
UNAUTHORIZED = "unauthorized"
REQUEST_BODY_TOO_LARGE = "request-body-too-large"
DUPLICATION_VIOLATION = "duplication-violation"
SERVER_ERROR = "server-error"
SERVICE_UNAVAILABLE = "service-unavailable"
TOO_MANY_REQUESTS = "too-many-requests"
UNSUPPORTED_MEDIA_TYPE = "unsupported-media-type"
METHOD_NOT_ALLOWED = "method-not-allowed"


@dataclass
class ApiError(Exception):
    """An awork API error; `headers` are extra response headers (e.g. rate-limit ones)."""

    status: int
    code: str
    description: str
    details: list[str] = field(default_factory=list)
    validation_errors: list[tuple[str, str]] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)

    def body(self, trace_id: str) -> bytes:
        return awork_error_body(
            self.code, self.description, trace_id, self.details, self.validation_errors
        )


def awork_error_body(
    code: str,
    description: str,
    trace_id: str,
    details: list[str] | None = None,
    validation_errors: list[tuple[str, str]] | None = None,
) -> bytes:
    """awork's ErrorResponse: every key present, as its .NET serializer writes them."""
    return json.dumps(
        {
            "code": code,
            "description": description,
            "link": AWORK_DOCS_LINK,
            "details": list(details or []),
            "validationErrors": [
                {"property": prop, "message": msg} for prop, msg in (validation_errors or [])
            ],
            "traceId": trace_id,
        }
    ).encode()


def validation_failed(errors: list[tuple[str, str]], description: str = "") -> ApiError:
    return ApiError(
        400,
        VALIDATION_FAILED,
        description or "One or more validation errors occurred.",
        validation_errors=errors,
    )


def not_found(detail: str) -> ApiError:
    return ApiError(404, NOT_FOUND, "The requested entity could not be found.", details=[detail])


NO_ROUTE = ApiError(404, NOT_FOUND, "There is no matching path for this URL.")


# --- Azure Blob ----------------------------------------------------------------------------

# Azure's standard messages for the codes the blob host sends.
AZURE_MESSAGES: dict[str, str] = {
    "AuthenticationFailed": "Server failed to authenticate the request. Make sure the value of "
    "Authorization header is formed correctly including the signature.",
    "AuthorizationPermissionMismatch": "This request is not authorized to perform this "
    "operation using this permission.",
    "MissingRequiredHeader": "An HTTP header that's mandatory for this request is not specified.",
    "MissingContentLengthHeader": "The Content-Length header was not specified.",
    "Md5Mismatch": "The MD5 value specified in the request did not match with the MD5 value "
    "calculated by the server.",
    "InvalidMd5": "The MD5 value specified in the request is invalid. The MD5 value must be "
    "128 bits and Base64-encoded.",
    "RequestBodyTooLarge": "The request body is too large and exceeds the maximum permissible "
    "limit.",
    "InvalidQueryParameterValue": "Value for one of the query parameters specified in the "
    "request URI is invalid.",
    "MissingRequiredQueryParameter": "A query parameter that's mandatory for this request is "
    "not specified.",
    "InvalidBlobOrBlock": "The specified blob or block content is invalid.",
    "InvalidBlockList": "The specified block list is invalid.",
    "InvalidXmlDocument": "XML specified is not syntactically valid.",
    "InvalidHeaderValue": "The value for one of the HTTP headers is not in the correct format.",
    "BlobNotFound": "The specified blob does not exist.",
    "ContainerNotFound": "The specified container does not exist.",
    "UnsupportedHttpVerb": "The resource doesn't support the specified HTTP verb.",
    "InternalError": "The server encountered an internal error. Please retry the request.",
    "ServerBusy": "The server is busy.",
    "TooManyRequests": "The server is busy (sandbox: injected 429).",
    "BlockCountExceedsLimit": "The uncommitted block count cannot exceed the maximum limit of "
    "100,000 blocks.",
    "IncompleteBody": "The request body is incomplete.",
}


@dataclass
class BlobError(Exception):
    """An Azure Blob error; `extra` elements follow Message, as Azure adds e.g. HeaderName."""

    status: int
    code: str
    extra: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)

    def body(self, request_id: str) -> bytes:
        return azure_error_body(self.code, request_id, self.extra)


def auth_failed(detail: str) -> BlobError:
    return BlobError(403, "AuthenticationFailed", {"AuthenticationErrorDetail": detail})


def azure_error_body(code: str, request_id: str, extra: dict[str, str] | None = None) -> bytes:
    """`<Error><Code/><Message/>...</Error>`; Azure appends RequestId and Time to the message."""
    message = f"{AZURE_MESSAGES.get(code, code)}\nRequestId:{request_id}\nTime:{_azure_now()}"
    more = "".join(f"<{k}>{escape(v)}</{k}>" for k, v in (extra or {}).items())
    return (
        '<?xml version="1.0" encoding="utf-8"?><Error>'
        f"<Code>{escape(code)}</Code><Message>{escape(message)}</Message>{more}</Error>"
    ).encode()


def _azure_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f0Z")
