"""Rules for text that crosses a trust boundary: spec fields, and the same fields read back.

Producers apply them to a spec before anything is staged; workers apply them again to what
they read from a job record (anyone who can write Redis can write a record). One module, so
both sides refuse exactly the same things.
"""

from __future__ import annotations

import unicodedata

from producers.contract import SpecError

MAX_FILE_NAME_BYTES = 255  # what file systems and awork's own storage take, in UTF-8 bytes
MAX_DESCRIPTION = 4000
# Unicode categories never allowed in a file name: controls (C0, DEL, C1 such as U+0085), format
# characters (U+202E right-to-left override, zero-width joiners), line and paragraph separators.
# A name shown to people must look like what it is: `invoice\u202efdp.exe` shows as
# `invoiceexe.pdf`.
NAME_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp"})
# A description is free text: it may span lines and hold tabs, nothing else of those categories.
DESCRIPTION_ALLOWED_CONTROLS = frozenset("\t\n")


def _describe(char: str) -> str:
    name = unicodedata.name(char, "")
    return f"U+{ord(char):04X}" + (f" {name}" if name else "")


def refuse_controls(field: str, text: str, allowed: frozenset[str] = frozenset()) -> str:
    """`text` unchanged, or SpecError naming `field` when it holds a control character (Cc)."""
    for char in text:
        if unicodedata.category(char) == "Cc" and char not in allowed:
            raise SpecError(field, f"contains the control character {_describe(char)}")
    return text


def file_name(name: str, field: str = "name") -> str:
    """The awork file name: NFC-normalised, no control/format/separator characters, no path
    separator, at most 255 bytes in UTF-8."""
    if not isinstance(name, str):
        raise SpecError(field, f"expected text, got {type(name).__name__}")
    name = unicodedata.normalize("NFC", name).strip()
    if not name:
        raise SpecError(field, "the file name is empty")
    # printable ASCII holds none of the refused categories: only the separators are looked for
    plain = name.isascii() and name.isprintable()
    for char in "/\\" if plain else name:
        if not plain and unicodedata.category(char) in NAME_REFUSED_CATEGORIES:
            raise SpecError(field, f"the file name contains {_describe(char)}, which is not allowed")
        if char in "/\\" and char in name:
            raise SpecError(field, f"{name!r} contains a path separator")
    if name in (".", ".."):
        raise SpecError(field, f"{name!r} is not a file name")
    size = len(name.encode("utf-8"))
    if size > MAX_FILE_NAME_BYTES:
        raise SpecError(field, f"{size} bytes in UTF-8, more than {MAX_FILE_NAME_BYTES}")
    return name


def description(text: str | None, field: str = "description") -> str | None:
    """A description: at most 4000 characters, no control characters but tab and newline."""
    if text is None:
        return None
    if not isinstance(text, str):
        raise SpecError(field, f"expected text, got {type(text).__name__}")
    if len(text) > MAX_DESCRIPTION:
        raise SpecError(field, f"longer than {MAX_DESCRIPTION} characters")
    return refuse_controls(field, text, DESCRIPTION_ALLOWED_CONTROLS)
