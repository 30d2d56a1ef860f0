"""`ivl-fast demo --quick`: the whole pipeline end to end (pretraining, value training, fine-tuning, vocab map,
evaluation of every row, JSON/Markdown/PNG outputs), and the cache on a second run. Not the science."""

from __future__ import annotations

import json
import time

from ivl_fast.cli import main as cli_main
from ivl_fast.demo import ROW_NAMES, demonstrations, make_world


def test_world_separates_demonstrated_and_evaluated_people():
    w = make_world(24, seed=0)
    assert not set(w["demo_people"]) & set(w["eval_people"])
    demo_text = json.dumps(demonstrations(w))
    assert all(p not in demo_text for p in w["eval_people"])  # held-out facts never appear in the demos
    assert make_world(24, seed=0) == w  # seeded


def test_quick_demo_end_to_end(tmp_path, capsys):
    work = tmp_path / "demo"
    t0 = time.perf_counter()
    assert cli_main(["demo", "--quick", "--work-dir", str(work), "--json"]) == 0
    first = time.perf_counter() - t0
    out = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in out["rows"]] == ROW_NAMES
    for r in out["rows"]:
        assert 0 <= r["accuracy"] <= r["format_rate"] <= 1 and r["questions"] > 0
    for f in ("results.json", "results.md", "results.png"):
        assert (work / f).stat().st_size > 0
    assert (work / "value" / "ivl.json").is_file() and (work / "map_other_to_a.safetensors").is_file()
    # a second run reuses every artifact: only the evaluation runs again, with the same table
    t0 = time.perf_counter()
    assert cli_main(["demo", "--quick", "--work-dir", str(work), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert [(r["accuracy"], r["format_rate"]) for r in again["rows"]] == [
        (r["accuracy"], r["format_rate"]) for r in out["rows"]
    ]
    assert time.perf_counter() - t0 < first
