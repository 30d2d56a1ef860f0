"""Fused combine_and_sample (Triton) vs the torch reference (sparse matmul, add, sort-based top-p, softmax,
multinomial-equivalent race), per call, for B in {1, 8, 64} and V in {32000, 128256}, with and without a
vocab map. GPU only (the Triton interpreter on CPU says nothing about speed).

Goals (issue): B=1, V=32000: fused <= 1/3 of the reference and <= 30 us; B=64, V=128256: <= 1/5.
Floor: the kernel reads the bf16 logits once and the fp32 workspace (B x V x 4 bytes) once per search pass.
``IVL_BENCH_OUT=path.json`` writes every row (medians of 7 timings of 50 calls, with ranges) with the achieved
bytes/s, and the provenance.
"""

from __future__ import annotations

import pytest
import torch
from conftest import save_results, spread

from ivl_fast.ops import combine_and_sample
from ivl_fast.vocab import VocabMap

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="timings need a GPU")
ROWS: list[dict] = []
SAMPLING = dict(do_sample=True, temperature=0.7, top_k=50, top_p=0.9, min_p=0.0)


def _time(fn, iters=50, repeats=7) -> dict:
    """us per call: the mean of ``iters`` back-to-back calls, taken ``repeats`` times (median and range)."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) / iters * 1e3)
    return spread(samples)


@pytest.mark.parametrize("with_map", [False, True])
@pytest.mark.parametrize("v", [32000, 128256])
@pytest.mark.parametrize("b", [1, 8, 64])
def test_combine_and_sample_speed(b, v, with_map, benchmark):
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    value = torch.randn(b, v, device=dev, generator=g).bfloat16()
    vmap = None
    base = torch.randn(b, v, device=dev, generator=g).bfloat16()
    if with_map:  # a permutation-like map with 2 entries per value token (cross-vocabulary shape)
        vb = v + 1000
        idx = torch.randint(0, vb, (v * 2,), generator=torch.Generator().manual_seed(0))
        w = torch.zeros(vb, v)
        w[idx, torch.arange(v).repeat(2)] = 0.5
        vmap = VocabMap.from_dense(w)
        base = torch.randn(b, vb, device=dev, generator=g).bfloat16()
    seed, off = torch.tensor([0], device=dev), torch.tensor([0], device=dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    fused = _time(
        lambda: combine_and_sample(base, value, vocab_map=vmap, seed=seed, offset=off, backend="triton", **SAMPLING)
    )
    ref = _time(lambda: combine_and_sample(base, value, vocab_map=vmap, generator=gen, backend="torch", **SAMPLING))
    passes = 1 + 8 + 8 + 1  # workspace passes of the sampling path (top_k and top_p on)
    bytes_moved = base.numel() * 2 + value.numel() * 2 + b * v * 4 * (1 + passes)
    row = {"B": b, "V": v, "map": with_map, "fused_us": fused, "ref_us": ref, "ratio": fused["median"] / ref["median"]}
    row["fused_GBps"] = bytes_moved / (fused["median"] * 1e-6) / 1e9
    ROWS.append(row)
    benchmark.extra_info.update({k: x["median"] if isinstance(x, dict) else x for k, x in row.items()})
    benchmark.pedantic(lambda: None, rounds=1)
    save_results(
        {"benchmark": "combine_and_sample: fused kernel vs torch reference", "sampling": SAMPLING, "rows": ROWS}
    )
