"""fused_ce_l1 vs the naive materialised loss: peak extra memory and time of forward+backward.

Goal (issue): peak memory <= 0.25x naive; time <= 1.0x naive on GPU. Each variant runs in a fresh process
(bench/fused_ce_l1_mem.py). ``IVL_BENCH_OUT=path.json`` writes both rows and the ratios.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).parent


def _run(variant: str) -> dict:
    out = subprocess.run(
        [sys.executable, str(HERE / "fused_ce_l1_mem.py"), variant], capture_output=True, text=True, timeout=3000
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_fused_ce_l1_memory_and_time(benchmark):
    rows = {}

    def both():
        rows["naive"] = _run("naive")
        rows["fused"] = _run("fused")

    benchmark.pedantic(both, rounds=1, iterations=1)
    naive, fused = rows["naive"], rows["fused"]
    ratio_mem = fused["peak_extra_bytes"] / naive["peak_extra_bytes"]
    ratio_time = fused["seconds_min"] / naive["seconds_min"]
    rel = abs(fused["loss"] - naive["loss"]) / abs(naive["loss"])
    summary = {"memory_ratio": ratio_mem, "time_ratio": ratio_time, "loss_rel_diff": rel}
    benchmark.extra_info.update(summary)
    print(f"\nfused/naive peak extra memory {ratio_mem:.3f}, time {ratio_time:.3f}, loss rel diff {rel:.2e}")
    if os.environ.get("IVL_BENCH_OUT"):
        import transformers

        Path(os.environ["IVL_BENCH_OUT"]).write_text(
            json.dumps(
                {
                    "benchmark": "fused_ce_l1 forward+backward vs naive torch loss",
                    "command": "IVL_BENCH_OUT=... pytest bench/test_fused_ce_l1.py -s",
                    "device": naive["device"],
                    "machine": platform.machine(),
                    "cpu_count": os.cpu_count(),
                    "torch": torch.__version__,
                    "transformers": transformers.__version__,
                    "rows": [naive, fused],
                    **summary,
                },
                indent=2,
            )
        )
    assert rel < 1e-3  # same loss
    assert ratio_mem <= 0.25
