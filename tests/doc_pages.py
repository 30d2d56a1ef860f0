"""The project's documentation as the tests read it: README.md and the pages under docs/ (README links them)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def documentation() -> str:
    """README.md and every docs/*.md page, one after the other (a generated block lives in exactly one of them)."""
    return "\n".join(p.read_text(encoding="utf-8") for p in pages())
