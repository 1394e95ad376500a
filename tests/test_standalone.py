"""The repository stands on its own: no tracked file points at documents a user who clones
or installs wirestate does not have (the planning folder beside the repository, its design,
style and breaker notes, or the numbers of the issues work was tracked under). What users and
maintainers need of them is in docs/, in the project's own words."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).parents[1]
# Spelled in pieces, so that this file does not match itself.
FORBIDDEN = re.compile(
    "|".join(
        [
            re.escape("../" + "shared"),
            r"\b" + "DESIGN" + r"\.md\b",
            r"\b" + "BREAKER" + r"\.md\b",
            r"\b" + "STYLE" + r"\.md\b",
            "tech" + r"[- ]notes",
            "origin-" + "postmortem",
            r"\b[Ii]ssue" + r"s? #?\d+\b",
        ]
    )
)
BINARY = (".png", ".svg", ".jpg", ".ico", ".whl")


def _hits() -> list[str]:
    tracked = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files"], capture_output=True, text=True, check=True
    ).stdout.split()
    hits = []
    for name in tracked:
        if name.endswith(BINARY):
            continue
        text = (ROOT / name).read_text(encoding="utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            if FORBIDDEN.search(line):
                hits.append(f"{name}:{number}: {line.strip()[:120]}")
    return hits


def test_no_file_names_a_document_outside_the_repository() -> None:
    assert _hits() == []


def test_the_pattern_bites() -> None:
    for bad in ("see ../" + "shared/x", "DESIGN" + ".md", "issue" + " 12", "Issue" + " #4"):
        assert FORBIDDEN.search(bad), bad
    # Near misses, spelled in pieces too: a project doc, the word alone, a longer word.
    for fine in ("docs/" + "breaker" + ".md", "the " + "issue is", "t" + "issue" + " 3"):
        assert not FORBIDDEN.search(fine), fine
