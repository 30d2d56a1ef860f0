"""Argument checks shared by every layer: one home for "an integer, not a bool" and "a finite number" (bottom layer:
imports nothing of the package). Each check returns the value or raises a ValueError naming the argument, the
expected range and the value given, in one wording across the package."""

from __future__ import annotations

import math


def is_int(x) -> bool:
    """An integer and not a bool (``True`` is an ``int`` to Python, never a count or a token id here)."""
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x) -> bool:
    """An int or a float, not a bool."""
    return isinstance(x, int | float) and not isinstance(x, bool)


def check_int(x, name: str, lo: int | None = None, hi: int | None = None) -> int:
    """``x`` if it is an integer (not a bool) in ``[lo, hi]`` (either bound optional), else ValueError: "``name``
    must be an integer >= lo" (or "in [lo, hi]", "<= hi"), "got ..."."""
    if is_int(x) and (lo is None or x >= lo) and (hi is None or x <= hi):
        return x
    if lo is not None and hi is not None:
        want = f"an integer in [{lo}, {hi}]"
    elif lo is not None:
        want = f"an integer >= {lo}"
    elif hi is not None:
        want = f"an integer <= {hi}"
    else:
        want = "an integer"
    raise ValueError(f"{name} must be {want}, got {x!r}")


def check_finite(x, name: str) -> float:
    """``x`` if it is a finite int or float (not a bool), else ValueError "``name`` must be a finite number"."""
    if is_number(x) and math.isfinite(x):
        return x
    raise ValueError(f"{name} must be a finite number, got {x!r}")


__all__ = ["check_finite", "check_int", "is_int", "is_number"]
