"""Two source trees' decode speed on one machine, interleaved: the decode-core refactor's before/after check.

    git worktree add /tmp/before 544b89d && cp -r kernels /tmp/before/ivl_fast/kernels
    IVL_BENCH_OUT=bench/results/decode_core_refactor_cpu.json python bench/decode_core_compare.py /tmp/before 8

and the seams' renovation (issue #33; ivl_fast/kernels is a link in the tree by then, nothing to copy):

    git worktree add --detach /tmp/before 62ae0a7
    IVL_BENCH_OUT=bench/results/decode_seams_cpu.json python bench/decode_core_compare.py /tmp/before 6

Each pass runs ``bench/decode_core_speed.py`` once per tree in a fresh process (ABBA order, so a drift of the
machine hits both alike); each of those takes the best of 5 calls. Written: per tree and batch size the spread
of those bests over the passes, and the spread of the per-pass ratio after/before.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from conftest import save_results, spread  # noqa: E402


def run_tree(tree: str | None) -> dict:
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = tree
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "r.json"
        subprocess.run(
            [sys.executable, str(HERE / "decode_core_speed.py"), str(out)], env=env, check=True, capture_output=True
        )
        return json.loads(out.read_text())


def main(before: str, passes: int) -> None:
    bests: dict = {"before": {}, "after": {}}
    ops: dict = {"before": {}, "after": {}}
    for p in range(passes):
        order = ("before", "after") if p % 2 == 0 else ("after", "before")
        for side in order:
            r = run_tree(before if side == "before" else None)
            if side == "before" and Path(r["tree"]).resolve() != Path(before).resolve():
                raise SystemExit(f"the 'before' run imported ivl_fast from {r['tree']}, not {before}")
            for k, v in r["runs"].items():
                bests[side].setdefault(k, []).append(v["best_tokens_per_s"])
                ops[side][k] = v.get("aten_ops_per_step")  # deterministic: the same every pass
    result = {
        "config": {
            "passes": passes,
            "before_tree": before,
            "before_commit": subprocess.run(
                ["git", "-C", before, "rev-parse", "HEAD"], capture_output=True, text=True
            ).stdout.strip(),
            "model": "demo shapes: base 4x128, value 2x64, "
            "600 tokens, fp32, greedy, 32 new tokens, EOS off; best of 5 calls per pass",
        },
        "figures": {},
    }
    for k in bests["after"]:
        ratios = [a / b for a, b in zip(bests["after"][k], bests["before"][k], strict=True)]
        result["figures"][k] = {
            "before_tokens_per_s": spread(bests["before"][k]),
            "after_tokens_per_s": spread(bests["after"][k]),
            "after_over_before": spread(ratios),
            "before_aten_ops_per_step": ops["before"][k],
            "after_aten_ops_per_step": ops["after"][k],
        }
    print(json.dumps(result["figures"], indent=1))
    save_results(result)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 8)
