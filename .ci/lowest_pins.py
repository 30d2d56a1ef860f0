"""Print `name==floor` for every runtime dependency of pyproject.toml (its `>=` bound): the lowest versions the
package claims, which .ci/lowest-versions installs and tests. A dependency without a floor is an error: a claim
nobody tested."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def floors(requirements: list[str]) -> list[str]:
    pins = []
    for req in requirements:
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*>=\s*([0-9][0-9A-Za-z.]*)", req.strip())
        if not m:
            raise SystemExit(f"pyproject.toml: {req!r} has no plain '>=' floor to test")
        pins.append(f"{m[1]}{m[2] or ''}=={m[3]}")
    return pins


if __name__ == "__main__":
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = sys.argv[1:]  # e.g. `triton`: that extra's floors too
    reqs = list(project["dependencies"])
    for extra in extras:
        reqs += project["optional-dependencies"][extra]
    print(" ".join(floors(reqs)))
