"""one_line(): the command line's error contract (one line, `ivl-fast <cmd>: error: ...`, exit code 2, no traceback),
shared by the tests that drive the CLI with bad input."""

from __future__ import annotations

import re


def one_line(rc: int, err: str, *needles: str) -> None:
    lines = [ln for ln in re.split(r"[\r\n]", err) if ln.strip() and "it/s" not in ln and "step/s" not in ln]
    assert rc == 2 and "Traceback" not in err, err
    errors = [ln for ln in lines if ": error: " in ln]
    assert len(errors) == 1 and all(n in errors[0] for n in needles), err
