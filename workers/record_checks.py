"""Worker read checks: a job record is input, not trusted state.

Anyone who can write to Redis can write a record, so before a step acts on one it checks the
fields it is about to use with the producers' own rules (producers.text_rules, producers.spec):
the record is the job it claims to be, and its file name, description and content type would
have passed validation. A record that fails fails its job (`record-invalid`, naming the field);
nothing of it is sent to awork.
"""

from __future__ import annotations

from collections.abc import Mapping

from producers import text_rules
from producers.contract import SpecError
from producers.spec import check_content_type
from workers.errors import PermanentError


def check_record(job_id: str, record: Mapping[str, str]) -> None:
    """PermanentError (`record-invalid`) naming the first field that would not pass validation."""
    try:
        if record.get("id") != job_id:
            raise SpecError("id", "the record's id is not the job's id")
        name = record.get("file_name", "")
        if text_rules.file_name(name, "file_name") != name:
            raise SpecError("file_name", "not in normal form (NFC, no surrounding spaces)")
        text_rules.description(record.get("description") or None)
        if record.get("content_type"):
            check_content_type(record["content_type"])
    except SpecError as exc:
        raise PermanentError(f"job record field {exc}", code="record-invalid") from None
