"""Benchmarks (pytest-benchmark). Run: ``pytest bench/ --benchmark-json=out.json``.

Decode environment knobs (defaults: the tiny pair on CPU; TinyLlama-1.1B value + Llama-2-7B base on GPU):
  IVL_BENCH_PAIRS   comma list of VALUE+BASE config names from bench/configs (e.g. tinyllama-1.1b+llama-2-13b)
  IVL_BENCH_BATCH   comma list of batch sizes (default 1,8)
  IVL_BENCH_NEW     comma list of new-token counts per generate call (default 128,512 on GPU, 32 on CPU)
  IVL_BENCH_PROMPT  prompt length (default 128)
  IVL_BENCH_GRAPHS  the decoder's graphs option (default auto: CUDA graphs on GPU, eager on CPU; "emulate" runs the
                    graph path on CPU at eager speed, a smoke test of the code, not a timing)
  IVL_BENCH_ROUNDS  timed rounds after the warm-up call (default 2)
  IVL_BENCH_SUMMARY if set, the summary records are written there (bench/results/decode_summary.json), every
                    raw record with versions and settings beside it (*_full.json), and a PNG of ms/token
The terminal summary prints per-token times and the ratios the goals are stated in.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).parent / "configs"
DECODE: list[dict] = []


def invocation() -> str:
    """The exact command this process runs: the IVL_*/TRITON_* settings in its environment, then its argv."""
    env = [f"{k}={shlex.quote(v)}" for k, v in sorted(os.environ.items()) if k.startswith(("IVL_", "TRITON_"))]
    under_pytest = Path(sys.argv[0]).name in ("pytest", "py.test", "__main__.py")  # __main__.py: python -m pytest
    words = ["pytest", *sys.argv[1:]] if under_pytest else ["python", *sys.argv]
    return " ".join([*env, *map(shlex.quote, words)])


def spread(samples: list[float]) -> dict:
    """A figure over repeated runs: the median to quote, its range, and every sample."""
    return {
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
        "runs": len(samples),
        "samples": list(samples),
    }


def save_results(payload: dict, command: str | None = None) -> Path | None:
    """Write ``payload`` with its provenance (command, date, machine, versions, commit) to $IVL_BENCH_OUT."""
    out = os.environ.get("IVL_BENCH_OUT")
    if not out:
        return None
    from ivl_fast.provenance import provenance

    path = Path(out)
    path.write_text(json.dumps({"provenance": provenance(command or invocation()), **payload}, indent=2) + "\n")
    return path


def bench_settings() -> dict:
    gpu = torch.cuda.is_available()
    return {
        "pairs": os.environ.get(
            "IVL_BENCH_PAIRS", "tinyllama-1.1b+llama-2-7b" if gpu else "tiny-value+tiny-base"
        ).split(","),
        "batches": [int(b) for b in os.environ.get("IVL_BENCH_BATCH", "1,8").split(",")],
        "new_tokens": [int(n) for n in os.environ.get("IVL_BENCH_NEW", "128,512" if gpu else "32").split(",")],
        "prompt_len": int(os.environ.get("IVL_BENCH_PROMPT", "128")),
        "graphs": os.environ.get("IVL_BENCH_GRAPHS", "auto"),
        "rounds": int(os.environ.get("IVL_BENCH_ROUNDS", "2")),
        "device": "cuda" if gpu else "cpu",
        "dtype": "bfloat16" if gpu else "float32",
    }


def random_hf(cfg: dict, device: str, dtype: torch.dtype, seed: int):
    """A transformers causal LM of config dict ``cfg`` (bench/configs) with random weights of ``seed``, built on
    ``device`` in ``dtype`` (no weights are downloaded: the benches measure speed, not quality)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    c = AutoConfig.for_model(**cfg)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            m = AutoModelForCausalLM.from_config(c)
    finally:
        torch.set_default_dtype(prev)
    return m.eval()


def load_config(name: str) -> dict:
    return json.loads((CONFIG_DIR / f"{name}.json").read_text())


def _device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"


def decode_summary(records: list[dict], copy_bw: float | None) -> list[dict]:
    """One record per (pair, batch, new_tokens), in the format of bench/results/decode_summary.json."""
    by_key: dict = {}
    for r in records:
        by_key.setdefault((r["pair"], r["batch"], r["new_tokens"]), {})[r["variant"]] = r
    out = []
    for (pair, batch, new), v in sorted(by_key.items()):
        value, base = pair.split("+")
        ms = {k: r["ms_per_token"] for k, r in v.items()}
        graph_pairs = {k: ms[k] for k in ("pair_fused", "pair_two_stream") if k in ms}
        best = min(graph_pairs, key=graph_pairs.get) if graph_pairs else None
        rec = {
            "device": _device_name(),
            "torch": torch.__version__,
            "base": base,
            "value": value,
            "batch": batch,
            "new_tokens": new,
            "ms_per_token": {
                "base_alone": ms.get("base_alone"),
                "pair": graph_pairs.get(best) if best else None,
                "pair_one_stream": ms.get("pair_one_stream"),
                "pair_naive_hf": ms.get("pair_naive_hf"),
                "pair_fused": ms.get("pair_fused"),
                "pair_two_stream": ms.get("pair_two_stream"),
                "pair_eager": ms.get("pair_eager"),
            },
            "pair_layout": best,
            "bandwidth_fraction": (
                v[best]["achieved_bytes_per_s"] / copy_bw
                if best and copy_bw and "achieved_bytes_per_s" in v[best]
                else None
            ),
            "idle_fraction": v[best].get("idle_fraction") if best else None,
            "graphs": v[best].get("graphs") if best else None,
        }
        m = rec["ms_per_token"]
        rec["pair_over_base"] = m["pair"] / m["base_alone"] if m["pair"] and m["base_alone"] else None
        rec["naive_over_pair"] = m["pair_naive_hf"] / m["pair"] if m["pair"] and m["pair_naive_hf"] else None
        out.append(rec)
    return out


def plot_decode(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict = {}
    for r in summary:
        groups.setdefault((r["value"], r["base"], r["batch"]), []).append(r)
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
    for ax, ((value, base, batch), rows) in zip(axes[0], sorted(groups.items()), strict=True):
        rows.sort(key=lambda r: r["new_tokens"])
        xs = [r["new_tokens"] for r in rows]
        for key in ("base_alone", "pair", "pair_one_stream", "pair_eager", "pair_naive_hf"):
            ys = [r["ms_per_token"][key] for r in rows]
            if all(y is not None for y in ys):
                ax.plot(xs, ys, marker="o", label=key)
        ax.set_title(f"{base} + {value}, batch {batch}", fontsize=9)
        ax.set_xlabel("new tokens")
        ax.set_ylabel("ms / token")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"ivl-fast decode on {summary[0]['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth (bytes read + written per second), measured now, best of 5 (the decode
    summary's memory floor)."""
    cuda = torch.cuda.is_available()
    n = (1 << 30) if cuda else (1 << 26)
    src = torch.empty(n, dtype=torch.uint8, device=bench_settings()["device"])
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(6):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src)
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n / best


def pytest_terminal_summary(terminalreporter):
    if not DECODE:
        return
    copy_bw = copy_bandwidth()
    summary = decode_summary(DECODE, copy_bw)
    tr = terminalreporter
    tr.section("ivl-fast decode summary (ms per generated token, batch rows together)")
    cols = ["base_alone", "pair", "pair_one_stream", "pair_eager", "pair_naive_hf"]
    tr.write_line(
        f"{'base + value':36s} {'b':>2s} {'new':>4s} "
        + " ".join(f"{c[:11]:>11s}" for c in cols)
        + f" {'pair/base':>9s} {'naive/pair':>10s} {'bw frac':>7s} {'idle':>5s}"
    )

    def fmt(x, w=11, p=3):
        return f"{x:{w}.{p}f}" if x is not None else f"{'-':>{w}s}"

    for r in summary:
        m = r["ms_per_token"]
        tr.write_line(
            f"{r['base'] + ' + ' + r['value']:36s} {r['batch']:2d} {r['new_tokens']:4d} "
            + " ".join(fmt(m[c]) for c in cols)
            + f" {fmt(r['pair_over_base'], 9)} {fmt(r['naive_over_pair'], 10)} {fmt(r['bandwidth_fraction'], 7, 2)}"
            + f" {fmt(r['idle_fraction'], 5, 2)}"
        )
    tr.write_line(f"device copy bandwidth measured in this run: {copy_bw / 1e9:.1f} GB/s")
    out = os.environ.get("IVL_BENCH_SUMMARY")
    if out:
        import transformers

        from ivl_fast.provenance import provenance

        info = {
            "provenance": provenance(invocation()),
            "device": _device_name(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "transformers": transformers.__version__,
            "settings": bench_settings(),
            "copy_bandwidth_bytes_per_s": copy_bw,
            "records": DECODE,
            "summary": summary,
        }
        path = Path(out)
        path.write_text(json.dumps(summary, indent=2))  # the list of records the README table shows
        path.with_name(path.stem + "_full.json").write_text(json.dumps(info, indent=2))
        plot_decode(summary, path.with_suffix(".png"))
