"""Worker logs: one line per step outcome, a JSON format as an option, and secrets masked.

- ``AWORK_LOG_FORMAT=json`` (default ``text``): every record becomes one JSON object per line
  with ``ts`` (UTC, ISO 8601), ``level``, ``logger``, ``message``, then the structured fields
  given through ``extra=`` (``job``, ``workspace``, ``step``, ``attempt``, ``outcome``,
  ``status``, ``code``, ``trace_id`` first, any other extra after them), the running Celery
  task's ``task_id``/``task_name``, and ``exc`` for a traceback.
- ``RedactingFilter`` masks anything that looks like a credential in every record, whatever
  the format: bearer tokens, ``Authorization`` values, URL signatures (SAS ``sig=``,
  ``X-Amz-Signature=``, ``X-Goog-Signature=``, URL-encoded ones too), passwords in
  ``redis://``/``rediss://``/``http(s)://`` URLs (even with ``/`` or ``@`` in them),
  ``x-api-key:`` and ``Cookie:`` headers, and ``password=``/``token=``/``api_key=``-style pairs.
  Keys are never logged on purpose; this is defence in depth.
- ``step_outcome(logger, ...)`` writes the one line per step outcome: the fields go both into
  the text (``step=... job=... workspace=... attempt=... outcome=... status=... code=...
  trace_id=...``) and into ``extra=`` for the JSON format.

In a worker, Celery's ``after_setup_logger``/``after_setup_task_logger`` signals install the
filter (and the JSON formatter when asked) on the handlers Celery configured; this module must be
imported before Celery sets up logging (it is, when the worker's ``include`` list or an included
module imports it). Other processes call ``configure_logging()``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, TextIO

FORMAT_ENV = "AWORK_LOG_FORMAT"
FORMATS = ("text", "json")
TEXT_FORMAT = "[%(asctime)s: %(levelname)s/%(processName)s] %(name)s: %(message)s"

# The fields of a step outcome, in the order they are written.
STEP_FIELDS = ("job", "workspace", "step", "attempt", "outcome", "status", "code", "trace_id")

MASK = "***"
_SECRET_NAMES = r"[\w.-]*(?:password|passwd|secret|token|api[_-]?key|basic[_-]?auth)"
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # Authorization: Bearer xyz / Basic xyz / "authorization": "..."
    (
        re.compile(r"(?i)(\bauthorization[\"']?\s*[:=]\s*[\"']?)((?:bearer|basic|token)\s+)?[^\s\"',;]+"),
        rf"\1\2{MASK}",
    ),
    (re.compile(r"(?i)\b(bearer)\s+(?!\*\*\*)[A-Za-z0-9\-._~+/]+=*"), rf"\1 {MASK}"),
    # URL signatures: Azure SAS sig=, S3 X-Amz-Signature=, GCS X-Goog-Signature=, plain or
    # URL-encoded (...%26sig%3Dabc%252F...), in a URL, a quoted string or a repr
    (
        re.compile(
            r"(?i)(?:(?<=%26)|(?<=%3F)|(?<![A-Za-z0-9_-]))"
            r"((?:sig|signature|x-amz-signature|x-goog-signature)(?:=|%3D))"
            r"(?:(?!%26)[^&\s\"'#<>])+"
        ),
        rf"\1{MASK}",
    ),
    # redis://user:password@host - a broker password may hold "/" or "@": up to the last "@"
    (
        re.compile(r"(?i)\b((?:rediss?|amqps?|sentinel)://[^:/@\s\"']*:)[^\s\"'<>]*@"),
        rf"\1{MASK}@",
    ),
    # http(s)://user:password@host (a "/" ends the authority: host:port/path@x is no password)
    (re.compile(r"(?i)\b(https?://[^:/@\s]*:)[^@\s/]+@"), rf"\1{MASK}@"),
    # header lines and header dicts: x-api-key: ..., api-key: ..., x-auth-token: ...
    (
        re.compile(r"(?i)\b((?:x-)?(?:api-key|auth-token)[\"']?\s*:\s*[\"']?)[^\s\"',;]+"),
        rf"\1{MASK}",
    ),
    # Cookie: a=b; c=d  /  Set-Cookie: ... (the whole value, up to the line's or string's end)
    (re.compile(r"(?i)\b((?:set-)?cookie[\"']?\s*:\s*[\"']?)[^\r\n\"']+"), rf"\1{MASK}"),
    # password=..., api_key=..., FLOWER_BASIC_AUTH=...
    (re.compile(rf"(?i)\b({_SECRET_NAMES}=)[^\s&\"',;]+"), rf"\1{MASK}"),
    # "password": "...", 'api_key': '...'
    (re.compile(rf"(?i)([\"']{_SECRET_NAMES}[\"']\s*:\s*[\"'])[^\"']*([\"'])"), rf"\1{MASK}\2"),
)


# Every pattern above needs one of these in the text (compared case-folded, with the dotless i
# that `(?i)` also takes for an i): most log lines have none, and are let through after a few
# substring checks instead of every pattern's search.
_TRIGGERS = ("auth", "bearer", "sig", "://", "api", "token", "cookie", "passw", "secret")


def redact(text: str) -> str:
    """`text` with anything that looks like a credential replaced by ***."""
    low = text.casefold().replace("\u0131", "i")
    if not any(t in low for t in _TRIGGERS):
        return text
    for pattern, repl in _PATTERNS:
        text = pattern.sub(repl, text)
    return text


# Attributes every LogRecord has: anything else on a record came in through `extra=`.
_STANDARD_ATTRS = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys()
    | {"message", "asctime", "taskName", "color_message"}
)


def record_extras(record: logging.LogRecord) -> dict[str, Any]:
    """The `extra=` fields of a record, step fields first."""
    extras = {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS and not k.startswith("_")}
    ordered = {k: extras.pop(k) for k in STEP_FIELDS if k in extras}
    ordered.update(extras)
    return ordered


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact_value(v) for v in value]
    return value


class RedactingFilter(logging.Filter):
    """Masks credentials in the message, its arguments, the traceback and string extras."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: let logging report it as usual
            return True
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        for key, value in record_extras(record).items():
            if isinstance(value, str | dict | list | tuple):
                setattr(record, key, _redact_value(value))
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, structured fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record_extras(record).items():
            if value is not None and key not in out:
                out[key] = value
        task = _current_task()
        if task is not None:
            out.setdefault("task_id", task[0])
            out.setdefault("task_name", task[1])
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def _current_task() -> tuple[str, str] | None:
    try:
        from celery._state import get_current_task
    except ImportError:  # pragma: no cover - celery is a dependency
        return None
    task = get_current_task()
    if task is None or task.request.id is None:
        return None
    return str(task.request.id), str(task.name)


def log_format(environ: dict[str, str] | None = None) -> str:
    """`text` or `json` from AWORK_LOG_FORMAT; anything else falls back to text, with a warning."""
    raw = (os.environ if environ is None else environ).get(FORMAT_ENV, "").strip().lower()
    if not raw:
        return "text"
    if raw not in FORMATS:
        logging.getLogger("awork.logging").warning(
            "%s=%r is not one of %s; using text", FORMAT_ENV, raw, ", ".join(FORMATS)
        )
        return "text"
    return raw


def install(handlers: Iterable[logging.Handler], fmt: str | None = None) -> None:
    """Add the redaction filter to `handlers` (once each) and, for json, the JSON formatter."""
    fmt = fmt or log_format()
    for handler in handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
        if fmt == "json" and not isinstance(handler.formatter, JsonFormatter):
            handler.setFormatter(JsonFormatter())


def configure_logging(level: int | str = logging.INFO, stream: TextIO | None = None) -> logging.Handler:
    """For processes that are not Celery workers: a root handler with the chosen format."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    install([handler])
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level)
    return handler


def step_outcome(
    logger: logging.Logger,
    *,
    job: str,
    workspace: str,
    step: str,
    attempt: int,
    outcome: str,
    status: int | None = None,
    code: str | None = None,
    trace_id: str | None = None,
    level: int = logging.INFO,
    **more: Any,
) -> None:
    """The one line for a step outcome; `more` (e.g. wait=1.5) is appended and kept as fields."""
    fields: dict[str, Any] = {
        "job": job,
        "workspace": workspace,
        "step": step,
        "attempt": attempt,
        "outcome": outcome,
        "status": status,
        "code": code,
        "trace_id": trace_id,
        **more,
    }
    text = " ".join(f"{k}={'-' if v is None else v}" for k, v in fields.items())
    logger.log(level, "step %s %s: %s", step, outcome, text, extra=fields)


# -- Celery hooks -----------------------------------------------------------------------------------
# Celery's own lines per task message ("Task ... received", "... succeeded in ...: <result>",
# "... retry: ..."): the step outcome line says the same with the job's fields, and formatting
# these cost about 1 ms of worker CPU a job. Their warnings and errors (a failed task, a
# traceback) still show.
QUIET_CELERY_LOGGERS = ("celery.worker.strategy", "celery.app.trace", "celery.worker.request")


def quiet_celery_task_lines() -> None:
    """Before the worker builds its tracer and strategies, which read these levels once."""
    for name in QUIET_CELERY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def _after_setup_logger(logger: logging.Logger | None = None, **_: Any) -> None:
    if logger is not None:
        install(logger.handlers)
    quiet_celery_task_lines()


def connect_signals() -> None:
    from celery.signals import after_setup_logger, after_setup_task_logger

    after_setup_logger.connect(_after_setup_logger, weak=False, dispatch_uid="awork-logging-root")
    after_setup_task_logger.connect(_after_setup_logger, weak=False, dispatch_uid="awork-logging-task")


connect_signals()

__all__ = [
    "FORMAT_ENV",
    "STEP_FIELDS",
    "JsonFormatter",
    "RedactingFilter",
    "configure_logging",
    "install",
    "log_format",
    "redact",
    "step_outcome",
]
