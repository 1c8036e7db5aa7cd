"""
The documentation's links: every relative link and image in README.md and docs/*.md
points at a file that exists, every #anchor at a heading of its page (GitHub's heading
ids), and every page in docs/ is reachable from the README. The commands in these files
are parsed by their scripts in test_workflows.py.
"""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

FENCE = re.compile(r"^(```|~~~)")
INLINE_CODE = re.compile(r"`[^`\n]*`")
# [text](target) and ![alt](target); the target may carry a "title".
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def prose_lines(text):
    """The lines of a Markdown text outside fenced code blocks, with inline code removed."""
    fenced = False
    for line in text.splitlines():
        if FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        if not fenced:
            yield INLINE_CODE.sub("", line)


def heading_anchor(heading):
    """GitHub's id for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)   # a link keeps its text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path):
    """Every heading id of a Markdown file, numbered as GitHub numbers repeated ones."""
    seen, ids = {}, set()
    for line in prose_lines(path.read_text()):
        match = HEADING.match(line)
        if match:
            anchor = heading_anchor(match.group(2))
            count = seen.get(anchor, 0)
            seen[anchor] = count + 1
            ids.add(anchor if count == 0 else f"{anchor}-{count}")
    return ids


def relative_links(path):
    """The relative link targets of a Markdown file (not URLs, not mail addresses)."""
    targets = []
    for line in prose_lines(path.read_text()):
        for target in LINK.findall(line):
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target, flags=re.I):
                targets.append(target)
    return targets


def broken_links(path):
    """The links of a Markdown file that do not resolve, each with the reason."""
    broken = []
    for target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(f"{target}: no file {linked}")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {linked.name}")
    return broken


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.relative_to(REPO).as_posix())
def test_every_relative_link_and_anchor_resolves(document):
    assert relative_links(document) or document.name != "README.md", "the README links nothing"
    broken = broken_links(document)
    assert not broken, f"{document.relative_to(REPO)}: broken links:\n" + "\n".join(broken)


def test_every_docs_page_is_reachable_from_the_readme():
    reached, queue = set(), [(REPO / "README.md").resolve()]
    while queue:
        page = queue.pop()
        if page in reached or page.suffix != ".md" or not page.exists():
            continue
        reached.add(page)
        for target in relative_links(page):
            file_part = target.partition("#")[0]
            if file_part:
                queue.append((page.parent / file_part).resolve())
    unreached = sorted(page.name for page in (REPO / "docs").glob("*.md") if page.resolve() not in reached)
    assert not unreached, f"docs pages no link leads to from README.md: {unreached}"


def test_the_docs_link_check_finds_broken_links(tmp_path):
    (tmp_path / "docs").mkdir()
    page = tmp_path / "docs" / "page.md"
    (tmp_path / "README.md").write_text(
        "# Title\n\n## Weights & Biases: a run\n\n[ok](docs/page.md#a-heading) [self](#title)\n")
    page.write_text(
        "# Page\n\n## A heading\n\n```bash\n# not a heading\n[in code](missing.md)\n```\n\n"
        "[back](../README.md#weights--biases-a-run) [web](https://example.com) `[code](nope.md)`\n"
        "[gone](missing.md) [no anchor](../README.md#not-a-heading) [code anchor](#not-a-heading)\n"
        "![picture](missing.png) [self anchor](#a-heading)\n")
    assert broken_links(tmp_path / "README.md") == []
    assert [entry.split(":")[0] for entry in broken_links(page)] == [
        "missing.md", "../README.md#not-a-heading", "#not-a-heading", "missing.png"]
