"""fused_ce_l1 vs the naive materialised loss: peak extra memory and time of forward+backward.

Goal (issue): peak memory <= 0.25x naive; time <= 1.0x naive on GPU. Each variant runs in a fresh process
(bench/fused_ce_l1_mem.py), IVL_CE_RUNS times each (default 3), interleaved. ``IVL_BENCH_OUT=path.json`` writes
every run, the medians with their ranges, and the provenance.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import save_results, spread

HERE = Path(__file__).parent


def _run(variant: str) -> dict:
    out = subprocess.run(
        [sys.executable, str(HERE / "fused_ce_l1_mem.py"), variant], capture_output=True, text=True, timeout=3000
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_fused_ce_l1_memory_and_time(benchmark):
    runs = int(os.environ.get("IVL_CE_RUNS", "3"))
    rows: dict[str, list[dict]] = {"naive": [], "fused": []}

    def interleaved():  # naive, fused, naive, fused, ...: a drift of the machine's speed hits both alike
        for _ in range(runs):
            for variant in rows:
                rows[variant].append(_run(variant))

    benchmark.pedantic(interleaved, rounds=1, iterations=1)

    def figures(variant: str) -> dict:
        rs = rows[variant]
        return {
            key: spread([r[key] for r in rs])
            for key in ("seconds_min", "peak_extra_bytes", "forward_peak_extra_bytes", "backward_peak_extra_bytes")
        }

    naive, fused = figures("naive"), figures("fused")
    mem = [f["peak_extra_bytes"] / n["peak_extra_bytes"] for n, f in zip(rows["naive"], rows["fused"], strict=True)]
    tim = [f["seconds_min"] / n["seconds_min"] for n, f in zip(rows["naive"], rows["fused"], strict=True)]
    loss_n, loss_f = rows["naive"][0]["loss"], rows["fused"][0]["loss"]
    summary = {
        "memory_ratio": spread(mem),  # fused / naive, run pair by run pair
        "time_ratio": spread(tim),
        "loss_rel_diff": abs(loss_f - loss_n) / abs(loss_n),
    }
    benchmark.extra_info.update({k: v["median"] if isinstance(v, dict) else v for k, v in summary.items()})
    mib = 2**20
    print(
        f"\nfused/naive peak extra memory {summary['memory_ratio']['median']:.3f} "
        f"({fused['peak_extra_bytes']['median'] / mib:.0f} vs {naive['peak_extra_bytes']['median'] / mib:.0f} MiB; "
        f"fused forward {fused['forward_peak_extra_bytes']['median'] / mib:.0f}, "
        f"backward {fused['backward_peak_extra_bytes']['median'] / mib:.0f} MiB), "
        f"time {summary['time_ratio']['median']:.3f} (range {summary['time_ratio']['min']:.3f}-"
        f"{summary['time_ratio']['max']:.3f}), loss rel diff {summary['loss_rel_diff']:.2e}"
    )
    shape = {k: rows["naive"][0][k] for k in ("device", "N", "V", "H", "dtype")}
    save_results(
        {
            "benchmark": "fused_ce_l1 forward+backward vs naive torch loss, each run in a fresh process",
            "config": shape,
            "naive": naive,
            "fused": fused,
            **summary,
            "runs": rows,
        }
    )
