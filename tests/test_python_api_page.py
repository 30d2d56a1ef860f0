"""docs/python-api.md's example runs as it stands: its code block, with the demo's checkpoint paths replaced by the
test suite's tiny pair (same kinds of directories), executed top to bottom; a few of its claims checked after."""

from __future__ import annotations

import re

from doc_pages import ROOT


def _first_python_block(text: str) -> str:
    return re.search(r"```python\n(.*?)```", text, re.S)[1]


def test_the_python_api_example_runs(pair, capsys):
    code = _first_python_block((ROOT / "docs" / "python-api.md").read_text())
    assert code.count('"ivl-demo/large"') == 2 and code.count('"ivl-demo/value"') == 2
    code = code.replace('"ivl-demo/large"', repr(str(pair[2]))).replace('"ivl-demo/value"', repr(str(pair[3])))
    scope: dict = {}
    exec(compile(code, "docs/python-api.md", "exec"), scope)  # noqa: S102  (the documentation's own example)
    assert scope["context"] == 256  # the tiny checkpoints' context, as the demo's
    assert scope["step_ids"].shape == (2,)  # the stream's last step: one id per prompt
    new = scope["new"]
    assert len(new.ids) == 2 and all(len(a) == 5 for a in new.alternatives)  # admission + one step, 5 alternatives
    printed = capsys.readouterr().out
    # the TextStreamer's reply (one row, min_new_tokens=4) and the progress callback's step counts
    assert len(printed.splitlines()) >= 2 and printed.splitlines()[-1].strip().isdigit()
