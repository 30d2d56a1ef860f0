"""README's make-tiny example, timed as a user runs it: ``ivl-fast generate ... --compare-base`` on the random
tiny pair, IVL_TINY_RUNS times (default 5), each a fresh process.

The CLI times its own generate calls (warm: one short call first) and prints tokens/s for the pair and the base
alone; this collects them over the runs. ``IVL_BENCH_OUT=path.json`` writes every run, the medians with their
ranges, and the provenance.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import save_results, spread

GENERATE = ["--prompt", "The for statement", "--max-new-tokens", "64", "--compare-base", "--json", "--no-progress"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "ivl_fast.cli", *args], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_make_tiny_generate_speed(tmp_path, benchmark):
    _cli("make-tiny", "--out", str(tmp_path / "ivl-tiny"))
    pair = ["generate", "--base", str(tmp_path / "ivl-tiny/base"), "--value", str(tmp_path / "ivl-tiny/value")]
    runs = []

    def all_runs():
        for _ in range(int(os.environ.get("IVL_TINY_RUNS", "5"))):
            runs.append(json.loads(_cli(*pair, *GENERATE).stdout.strip().splitlines()[-1]))

    benchmark.pedantic(all_runs, rounds=1, iterations=1)
    pair_tps = spread([r["speed"]["tokens_per_s"] for r in runs])
    base_tps = spread([r["base_alone"]["tokens_per_s"] for r in runs])
    ratio = spread([r["base_alone"]["pair_over_base_time_per_token"] for r in runs])
    print(
        f"\nmake-tiny pair {pair_tps['median']:.0f} tokens/s ({pair_tps['min']:.0f}-{pair_tps['max']:.0f}), "
        f"base alone {base_tps['median']:.0f} ({base_tps['min']:.0f}-{base_tps['max']:.0f}), pair/base time per "
        f"token {ratio['median']:.2f}x ({ratio['min']:.2f}-{ratio['max']:.2f}), {len(runs)} runs"
    )
    save_results(
        {
            "benchmark": "README's make-tiny example: ivl-fast generate --compare-base on the random tiny pair",
            # make-tiny with its defaults into a temporary dir, then generate --base DIR/base --value DIR/value ...
            "config": {"make_tiny_args": [], "generate_args": GENERATE},
            "pair_tokens_per_s": pair_tps,
            "base_tokens_per_s": base_tps,
            "pair_over_base_time_per_token": ratio,
            "runs": runs,
        }
    )
