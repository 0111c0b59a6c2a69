"""Every relative link in README.md and docs/*.md names a file that exists, and every #anchor a heading (or an
explicit <a id>) of the page it points into, with GitHub's anchor rules. Also: every docs page is reachable from the
README, and each starts with a title and a summary paragraph. No network: external links are not fetched."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
CODE_SPAN = re.compile(r"(`+)(?!`).*?(?<!`)\1(?!`)", re.S)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REF_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.M)
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)[ \t#]*$", re.M)
HTML_ID = re.compile(r"<a\s[^>]*(?:id|name)=\"([^\"]+)\"", re.I)
SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)


def prose(text: str) -> str:
    """The text outside fenced code blocks and code spans (links there are not links)."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def links(text: str) -> list[str]:
    body = prose(text)
    return LINK.findall(body) + REF_DEF.findall(body)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text as rendered (code marks, emphasis and link targets dropped), lower
    case, every character but letters, digits, spaces, - and _ removed, spaces to -."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text.replace("`", "")).replace("*", "")
    text = text.strip().lower()
    return "".join(c for c in text if c.isalnum() or c in "-_ ").replace(" ", "-")


def anchors(text: str) -> set[str]:
    out, seen = set(), {}
    for _, heading in HEADING.findall(FENCE.sub("", text)):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out | set(HTML_ID.findall(text))


def broken_links(page: Path) -> list[str]:
    out = []
    for target in links(page.read_text()):
        if not target or SCHEME.match(target) or target.startswith("//"):
            continue  # external (http, mailto): not fetched here
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            out.append(f"{target}: no such file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text()):
            out.append(f"{target}: no heading with anchor #{anchor} in {dest.name}")
    return out


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_resolve(page):
    assert broken_links(page) == [], f"{page.relative_to(ROOT)}: broken links"


def test_the_checker_finds_broken_links(tmp_path):
    # The control: the same checker on a page with one good and three bad links of each kind.
    (tmp_path / "other.md").write_text("# Other page\n\n## A `code` heading: yes\n\nText.\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n## Here, too\n\n[ok](other.md#a-code-heading-yes) [ok](#here-too) [ok](other.md)\n"
        "[bad](missing.md) [bad](other.md#nowhere) [bad](#not-here)\n"
        "`[in code](nope.md)`\n\n```\n[in a block](nope.md)\n```\n[ext](https://example.com/x.md)\n"
    )
    found = broken_links(page)
    assert [f.split(":")[0] for f in found] == ["missing.md", "other.md#nowhere", "#not-here"], found


def test_every_docs_page_is_reachable_from_the_readme():
    reached, todo = set(), [ROOT / "README.md"]
    while todo:
        page = todo.pop()
        if page in reached:
            continue
        reached.add(page)
        for target in links(page.read_text()):
            path = target.partition("#")[0]
            if path.endswith(".md") and not SCHEME.match(path):
                dest = (page.parent / path).resolve()
                if dest.exists():
                    todo.append(dest)
    unreached = [str(p.relative_to(ROOT)) for p in PAGES if p.resolve() not in reached]
    assert unreached == [], "docs pages no link leads to from README.md"


@pytest.mark.parametrize("page", PAGES[1:], ids=[str(p.relative_to(ROOT)) for p in PAGES[1:]])
def test_each_page_starts_with_a_title_and_a_summary(page):
    blocks = [b for b in page.read_text().split("\n\n") if b.strip()]
    assert blocks[0].startswith("# ") and "\n" not in blocks[0].strip(), "the first line is the page's # title"
    summary = blocks[1]
    assert not summary.lstrip().startswith(("#", "```", "|", "- ")), "a summary paragraph follows the title"
