"""Helpers for the tests that show nothing of the user's is lost: a user's directory, and a snapshot of a tree."""

from __future__ import annotations

import hashlib
from pathlib import Path


def snapshot(root: Path) -> dict[str, str]:
    """Every file and directory under root -> a hash of its bytes ("dir" for directories)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def user_dir(path: Path) -> Path:
    """A directory of the user's: files and a subfolder, nothing ivl-fast wrote."""
    (path / "notes").mkdir(parents=True)
    (path / "thesis.tex").write_text("my thesis")
    (path / "notes" / "todo.md").write_text("- finish")
    (path / "config.json").write_text('{"mine": true}')  # even a name ivl-fast would write
    return path
