"""The text of the README and of the docs/ pages, for the tests that check what they state."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def text(page: str) -> str:
    """README.md for "README", else docs/PAGE.md."""
    return (ROOT / ("README.md" if page == "README" else f"docs/{page}.md")).read_text()


def flat(page: str) -> str:
    """The page's text with every run of whitespace one space, so a phrase may wrap anywhere."""
    return " ".join(text(page).split())
