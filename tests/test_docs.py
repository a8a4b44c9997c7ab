"""Every document the code cites is in the repository (issue #21).

Scans the files git knows (tracked, plus new files not ignored) with a text suffix for citations of
`docs/<path>.md` with an optional `#anchor` (further anchors of the same page may follow as
`, #other`), and the pages under docs/ for their relative Markdown links. Each cited page must exist
and each anchor must be a heading of that page, slugged as GitHub does. The names of the design
documents that once lived outside the repository must not appear at all: a reader cannot follow them.
"""

from __future__ import annotations

import re
import subprocess
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SUFFIXES = (".py", ".md", ".yaml", ".yml", ".js", ".html", ".sh")

# Built from parts so that this file does not cite them itself.
OUTSIDE_NAMES = ("ICD" + "_SPEC", "KD" + "_BASELINES", "ARCHITECTURE" + r"\.md")
OUTSIDE = re.compile(r"(?<![\w-])(?:" + "|".join(OUTSIDE_NAMES) + r")(?![\w-])")

# docs/<path>.md[#anchor][, #anchor ...]; not preceded by a path or URL character (an external
# https://.../docs/x.md or ../docs/x.md is not a citation of this repository's docs/).
ANCHOR = r"#[\w-]+"
CITATION = re.compile(rf"(?<![\w/.-])(docs/[\w./-]*?\w\.md)((?:{ANCHOR})?(?:,\s*{ANCHOR})*)")
MD_LINK = re.compile(r"\]\(([^)\s]+)\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: link markup reduced to its text, lowercase, punctuation dropped
    (letters, digits, '-', '_' and spaces stay), spaces turned into '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors_of(markdown: str) -> set[str]:
    """Every anchor a page offers: its headings' slugs (repeats get -1, -2, ...) and explicit <a id=...>."""
    found: set[str] = set(HTML_ANCHOR.findall(markdown))
    seen: dict[str, int] = {}
    fence = ""
    for line in markdown.splitlines():
        opened = FENCE.match(line)
        if opened:
            mark = opened.group(1)
            if not fence:
                fence = mark
            elif mark[0] == fence[0] and len(mark) >= len(fence):
                fence = ""
            continue
        match = None if fence else HEADING.match(line)
        if match:
            base = slug(match.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


@cache
def _page_anchors(path: Path) -> frozenset[str]:
    return frozenset(anchors_of(path.read_text(encoding="utf-8")))


def citations(text: str) -> list[tuple[int, str, list[str]]]:
    """(line, cited page, anchors) of every docs/...md citation in the text."""
    out = []
    for number, line in enumerate(text.splitlines(), start=1):
        for match in CITATION.finditer(line):
            out.append((number, match.group(1), re.findall(ANCHOR, match.group(2))))
    return out


def problems_of(page: Path, anchors: list[str]) -> list[str]:
    """What is wrong with citing `anchors` of `page` ([] when the page exists and has them all)."""
    if not page.is_file():
        return ["no such file"]
    offered = _page_anchors(page)
    return [f"no heading with anchor {a}" for a in anchors if a[1:] not in offered]


def _text_files() -> list[Path]:
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=REPO,
            capture_output=True,
            check=True,
        ).stdout.decode()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: cannot list the repository's files")
    paths = [REPO / name for name in listed.split("\0") if name.endswith(SUFFIXES)]
    return [p for p in paths if p.is_file()]


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def test_cited_docs_and_anchors_exist() -> None:
    bad = []
    for path in _text_files():
        for line, cited, anchors in citations(_read(path)):
            for problem in problems_of(REPO / cited, anchors):
                bad.append(f"{path.relative_to(REPO)}:{line}: {cited}: {problem}")
    assert bad == []


def test_links_between_docs_pages_resolve() -> None:
    """Relative links inside docs/ (`[x](icd.md#bypass)`, `[x](#bypass)`) point at real pages and headings."""
    bad = []
    for path in sorted((REPO / "docs").rglob("*.md")):
        for number, line in enumerate(_read(path).splitlines(), start=1):
            for target in MD_LINK.findall(line):
                if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                    continue
                page, _, anchor = target.partition("#")
                resolved = (path.parent / page).resolve() if page else path
                if not page.endswith(".md") and page:
                    if not resolved.exists():
                        bad.append(f"{path.relative_to(REPO)}:{number}: {target}: no such file")
                    continue
                for problem in problems_of(resolved, [f"#{anchor}"] if anchor else []):
                    bad.append(f"{path.relative_to(REPO)}:{number}: {target}: {problem}")
    assert bad == []


def test_no_file_names_documents_outside_the_repository() -> None:
    bad = [
        f"{path.relative_to(REPO)}:{number}: {match.group(0)}"
        for path in _text_files()
        for number, line in enumerate(_read(path).splitlines(), start=1)
        for match in OUTSIDE.finditer(line)
    ]
    assert bad == [], "cite the matching page under docs/ instead"


def test_the_scanner_finds_what_it_must() -> None:
    """The checks above could pass by matching nothing: prove the patterns and the slugs work."""
    text = "see docs/method/icd.md#bypass, #keys and (docs/architecture.md)\nhttps://x.org/docs/a.md ../docs/b.md"
    assert citations(text) == [(1, "docs/method/icd.md", ["#bypass", "#keys"]), (1, "docs/architecture.md", [])]
    assert slug("Settings: paper, release & project") == "settings-paper-release--project"
    assert slug("`bypass_steps` and [the link](x.md)") == "bypass_steps-and-the-link"
    page = "# Title\n## Keys\n```\n# not a heading\n```\n## Keys\n"
    assert anchors_of(page) == {"title", "keys", "keys-1"}
    assert OUTSIDE.search("see " + "KD" + "_BASELINES §2") and OUTSIDE.search("ARCHITECTURE" + ".md")
    assert not OUTSIDE.search("ARCHITECTURE_FIELDS") and not OUTSIDE.search("docs/architecture.md")
    assert problems_of(REPO / "docs" / "method" / "icd.md", ["#no-such-heading"]) != []
    assert problems_of(REPO / "docs" / "method" / "icd.md", ["#bypass"]) == []
