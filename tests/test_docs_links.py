"""Every relative link in the repository's Markdown pages leads to a file that exists, inside
the repository, and to a heading that exists when it names one: pages move, links must follow.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SKIP_DIRS = {".git", ".venv", "node_modules", "var", ".mypy_cache", ".ruff_cache", ".pytest_cache"}
# [text](target) and [text](target "title"); images too. Code spans and fences are removed first.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`[^`\n]*`")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.MULTILINE)
EXTERNAL = ("http://", "https://", "mailto:")


def markdown_files() -> list[Path]:
    """The repository's own .md files (not those of installed packages or of node_modules)."""
    found: list[Path] = []
    for folder, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        found += [Path(folder) / f for f in files if f.endswith(".md")]
    return sorted(found)


def prose(text: str) -> str:
    """The text without fenced blocks and code spans, where brackets are not links."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a page, with GitHub's -1, -2 suffixes for repeated headings."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    for heading in HEADING.findall(FENCE.sub("", path.read_text())):
        base = slug(heading)
        n = seen.get(base, 0)
        out.add(base if n == 0 else f"{base}-{n}")
        seen[base] = n + 1
    return out


def broken_links(page: Path, root: Path = REPO) -> list[str]:
    """The relative links of one page that lead nowhere (or out of `root`), each with the reason."""
    problems: list[str] = []
    for target in LINK.findall(prose(page.read_text())):
        if target.startswith(EXTERNAL):
            continue
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / path_part).resolve() if path_part else page
        if not dest.is_relative_to(root):
            problems.append(f"{target}: outside the repository")
        elif not dest.exists():
            problems.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{target}: no heading with that anchor in {dest.relative_to(root)}")
    return problems


def test_the_pages_are_found() -> None:
    names = {str(p.relative_to(REPO)) for p in markdown_files()}
    assert "README.md" in names
    assert "ops/RUNBOOK.md" in names


def test_every_relative_link_resolves() -> None:
    problems = {
        str(page.relative_to(REPO)): broken for page in markdown_files() if (broken := broken_links(page))
    }
    assert problems == {}


def test_the_check_catches_a_broken_link(tmp_path: Path) -> None:
    """The checker itself: a missing file, a missing anchor and a path out of the tree are caught."""
    root = tmp_path.resolve() / "repo"
    (root / "docs").mkdir(parents=True)
    (root / "README.md").write_text("# Title\n\n## Two words\n")
    page = root / "docs" / "page.md"
    page.write_text(
        "# Probe\n\n[a](../README.md#two-words) [b](../no-such-file.md) [c](../README.md#no-such-heading)"
        " [d](../../outside.md) [e](#probe) [f](https://example.com/x) `[g](nowhere.md)`\n"
        "```\n[h](fenced.md)\n```\n"
    )
    assert [p.split(": ")[0] for p in broken_links(page, root)] == [
        "../no-such-file.md",
        "../README.md#no-such-heading",
        "../../outside.md",
    ]
