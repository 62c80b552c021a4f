"""The README and docs/ pages: every relative link points at a file that exists, and every
`#anchor` at a heading of its page (GitHub's rule: lowercase, spaces to hyphens, punctuation other
than hyphens and underscores dropped, repeats numbered)."""

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md"] + sorted(
    os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs")) if f.endswith(".md")
)


def _prose(text: str) -> str:
    """The page without code blocks and inline code (which show links, not make them)."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return re.sub(r"`[^`\n]*`", lambda m: m.group(0) if "](" in m.group(0) else "", text)


def anchors(path: str) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    with open(path) as f:
        for line in _prose(f.read()).splitlines():
            heading = re.match(r"#{1,6}\s+(.*)", line)
            if not heading:
                continue
            title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.group(1).strip()).lower()
            slug = re.sub(r"[^\w\- ]", "", title).replace(" ", "-")
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def links(page: str) -> list[str]:
    with open(os.path.join(ROOT, page)) as f:
        targets = re.findall(r"\]\(([^)\s]+)\)", _prose(f.read()))
    return [t for t in targets if not re.match(r"[a-z]+:", t)]  # http(s):, mailto: ...


def test_the_readme_is_a_front_door():
    with open(os.path.join(ROOT, "README.md")) as f:
        assert len(f.read().splitlines()) <= 200


@pytest.mark.parametrize("page", PAGES)
def test_every_relative_link_points_somewhere(page):
    assert links(page), f"{page} links nowhere"
    broken = []
    for target in links(page):
        path, _, fragment = target.partition("#")
        here = os.path.join(ROOT, os.path.dirname(page))
        full = os.path.normpath(os.path.join(here, path)) if path else os.path.join(ROOT, page)
        if not os.path.exists(full) or (fragment and fragment not in anchors(full)):
            broken.append(target)
    assert broken == [], f"{page}: links that point nowhere: {broken}"
