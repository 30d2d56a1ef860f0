"""Decode benchmarks (pytest-benchmark). Run: ``pytest bench/ --benchmark-json=out.json``.

Environment knobs (defaults: the tiny pair on CPU, TinyLlama-1.1B value + Llama-2-7B base on GPU):
  IVL_BENCH_PAIRS  comma list of VALUE+BASE config names from bench/configs (e.g. tinyllama-1.1b+llama-2-13b)
  IVL_BENCH_BATCH  comma list of batch sizes (default 1,8)
  IVL_BENCH_NEW    new tokens per generate call (default 128); prompt length IVL_BENCH_PROMPT (default 128)
  IVL_BENCH_OUT    if set, a JSON summary (device, versions, config, every figure) is written there
The terminal summary prints per-token times and the ratios pair/base and naive-HF/pair.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).parent / "configs"
RESULTS: list[dict] = []


def bench_settings() -> dict:
    gpu = torch.cuda.is_available()
    return {
        "pairs": os.environ.get(
            "IVL_BENCH_PAIRS", "tinyllama-1.1b+llama-2-7b" if gpu else "tiny-value+tiny-base"
        ).split(","),
        "batches": [int(b) for b in os.environ.get("IVL_BENCH_BATCH", "1,8").split(",")],
        "new_tokens": int(os.environ.get("IVL_BENCH_NEW", "128")),
        "prompt_len": int(os.environ.get("IVL_BENCH_PROMPT", "128")),
        "device": "cuda" if gpu else "cpu",
        "dtype": "bfloat16" if gpu else "float32",
    }


def load_config(name: str) -> dict:
    return json.loads((CONFIG_DIR / f"{name}.json").read_text())


def pytest_terminal_summary(terminalreporter):
    if not RESULTS:
        return
    tr = terminalreporter
    tr.section("ivl-fast decode summary (ms per generated token, batch rows together)")
    by_key: dict = {}
    for r in RESULTS:
        by_key.setdefault((r["pair"], r["batch"]), {})[r["variant"]] = r["ms_per_token"]
    tr.write_line(
        f"{'pair':40s} {'batch':>5s} {'base':>9s} {'pair':>9s} {'naive_hf':>9s} {'pair/base':>9s} {'naive/pair':>10s}"
    )
    summary = []
    for (pair, batch), v in sorted(by_key.items()):
        base, ours, naive = v.get("base"), v.get("pair"), v.get("naive_hf_pair")
        pb = ours / base if base and ours else None
        np_ = naive / ours if naive and ours else None
        summary.append({"pair": pair, "batch": batch, **v, "pair_over_base": pb, "naive_over_pair": np_})
        fmt = lambda x: f"{x:9.3f}" if x is not None else f"{'-':>9s}"  # noqa: E731
        tr.write_line(f"{pair:40s} {batch:5d} {fmt(base)} {fmt(ours)} {fmt(naive)} {fmt(pb)} {fmt(np_):>10s}")
    out = os.environ.get("IVL_BENCH_OUT")
    if out:
        import transformers

        info = {
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "transformers": transformers.__version__,
            "settings": bench_settings(),
            "results": RESULTS,
            "summary": summary,
        }
        Path(out).write_text(json.dumps(info, indent=2))
