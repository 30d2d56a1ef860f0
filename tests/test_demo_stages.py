"""The demo's progress lines: stage i/N in order, the time so far, an estimate once a stage was computed, and
"reusing" for a stage an earlier run built."""

from __future__ import annotations

import io
import time

import pytest

from ivl_fast.demo.run import STAGE_WEIGHTS
from ivl_fast.demo.stages import Stages


def test_stage_lines_count_reuse_and_estimate():
    out = io.StringIO()
    st = Stages([("a", 1.0), ("b", 1.0), ("c", 2.0)], out=out)
    st.begin("a", reused=True)
    st.begin("b")
    time.sleep(0.2)
    st.begin("c")
    total = st.end()
    lines = out.getvalue().splitlines()
    assert lines[0] == "demo: stage 1/3 [0:00 so far] a (reusing the work dir's)"
    assert lines[1] == "demo: stage 2/3 [0:00 so far] b"  # nothing computed yet: no estimate
    assert lines[2].startswith("demo: stage 3/3 [0:00 so far, about 0:00 left] c")  # 2 x 0.2 s left
    assert lines[3].startswith("demo: done in ") and total >= 0.2
    with pytest.raises(ValueError, match="is not the next one"):
        Stages([("a", 1.0)], out=out).begin("b")


def test_the_demo_names_each_of_its_stages_once():
    labels = [label for label, _ in STAGE_WEIGHTS]
    assert len(labels) == len(set(labels)) == 24 and labels[0] == "tokenizers" and labels[-1] == "timing"
