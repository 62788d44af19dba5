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
from producers.job_record import Field
from producers.spec import check_content_type
from workers.errors import PermanentError


def check_record(job_id: str, record: Mapping[str, str]) -> None:
    """PermanentError (`record-invalid`) naming the first field that would not pass validation."""
    try:
        if record.get(Field.ID) != job_id:
            raise SpecError(Field.ID, "the record's id is not the job's id")
        name = record.get(Field.FILE_NAME, "")
        if text_rules.file_name(name, Field.FILE_NAME) != name:
            raise SpecError(Field.FILE_NAME, "not in normal form (NFC, no surrounding spaces)")
        text_rules.description(record.get(Field.DESCRIPTION) or None)
        content_type = record.get(Field.CONTENT_TYPE)
        if content_type:
            check_content_type(content_type)
    except SpecError as exc:
        raise PermanentError(f"job record field {exc}", code="record-invalid") from None
