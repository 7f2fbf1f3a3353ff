"""README.md stays a newcomer's page: short, no development history, every relative link and `make` target real."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
LINK = re.compile(r"\]\(([^)\s]+)\)|<img\s[^>]*src=\"([^\"]+)\"")


def relative_links(text: str) -> list[str]:
    targets = [a or b for a, b in LINK.findall(text)]
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]


def test_readme_is_at_most_200_lines():
    assert len(README.splitlines()) <= 200


def test_every_relative_link_resolves():
    links = relative_links(README)
    assert "reports/grids/swaps.png" in links and "LICENSE" in links  # the parser sees both kinds of link
    missing = [t for t in links if not (REPO / t.split("#")[0]).exists()]
    assert missing == []


def test_no_development_history():
    assert not re.search(r"\bissues?\b|\bsessions?\b", README, re.IGNORECASE)


def test_the_make_targets_it_names_exist():
    makefile = (REPO / "Makefile").read_text()
    named = set(re.findall(r"`make ([a-z][a-z-]*)", README)) | set(re.findall(r"^make ([a-z][a-z-]*)", README, re.M))
    assert {"demo", "repro", "test"} <= named
    assert [t for t in sorted(named) if not re.search(rf"^{t}:", makefile, re.MULTILINE)] == []
