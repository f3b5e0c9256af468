"""Every link between the project's Markdown pages (README.md, docs/*.md) points at a file
that exists and, where it names a section (``#...``), at a heading of that file, as GitHub
renders the anchors. Sections get renamed and moved; a dead link is found here, not by a
reader."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, every character but
    letters, digits, spaces, hyphens and underscores removed, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = text.replace("`", "").replace("*", "").strip().lower()
    text = "".join(c for c in text if c.isalnum() or c in " -_")
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors of a page's headings (outside code blocks), a repeat getting -1, -2, ..."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    fenced = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        match = None if fenced else HEADING.match(line)
        if match:
            base = slug(match.group(1))
            count = seen.get(base, 0)
            found.add(base if count == 0 else f"{base}-{count}")
            seen[base] = count + 1
    return found


def local_links(page: Path) -> list[tuple[int, str]]:
    """(line, target) of every link that is not to the web or a mail address."""
    links, fenced = [], False
    for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            links += [
                (number, t)
                for t in LINK.findall(line)
                if not re.match(r"^[a-z][a-z0-9+.-]*:", t)  # http:, https:, mailto:
            ]
    return links


def test_slug_follows_github() -> None:
    assert slug("Beyond the paper: choosing the anomaly map without test labels") == (
        "beyond-the-paper-choosing-the-anomaly-map-without-test-labels"
    )
    assert slug("The memory channel through the pipeline (stops 63–64)") == (
        "the-memory-channel-through-the-pipeline-stops-6364"
    )
    assert slug("A reference by the normal maps' upper tail (built)") == (
        "a-reference-by-the-normal-maps-upper-tail-built"
    )


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_resolve(page: Path) -> None:
    dead = []
    for number, target in local_links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            dead.append(f"{page.name}:{number}: {target} (no file {path})")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            dead.append(f"{page.name}:{number}: {target} (no heading #{anchor} in {file.name})")
    assert not dead, "dead links; fix the link or the heading:\n" + "\n".join(dead)
