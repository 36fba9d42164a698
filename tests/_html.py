"""The start tags of an HTML page, with their attributes: what page tests look at."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {k: v or "" for k, v in attrs}))


def parse(path: Path) -> list[tuple[str, dict[str, str]]]:
    """``[(tag, {attribute: value})]`` of every start tag in the page at ``path``."""
    p = _Tags()
    p.feed(path.read_text(encoding="utf-8"))
    p.close()
    return p.tags
