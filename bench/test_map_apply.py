"""Pushing the base's distribution through a vocabulary map, per decode step: ``VocabMap.apply`` (its W^T CSR
operand made once per device and dtype) against the same product with the operand rebuilt on every call (the
implementation before 2026-12-07: wrap the CSR arrays, cast, transpose, then multiply), in one run, same inputs.

Where it runs: every cross-vocabulary step on the torch sampler (CPU), the boundary rule's mixture, scoring across
vocabularies, and steps that record scores or components. Shapes of the committed real pairs: tekken_240911
(131072 tokens) <-> tokenizer_v1 (32000), DEFAULT_TOP_K = 2 value tokens per base token (a synthetic map of that
shape and fill: the product's cost depends on the shape and the nonzeros, not on which tokens they are).

Floor per call (fp32): read z [B, V_base] and write its softmax (8 B * B * V_base), read the map's nonzeros
(col int64 + val fp32 = 12 B per nonzero, ``crow`` 8 B per row), write p and its log [B, V_value] (8 B * B *
V_value). ``IVL_BENCH_OUT=path.json`` writes every figure (medians of 7 timings, each the mean of 10 calls) with
the bytes moved over the time taken.
"""

from __future__ import annotations

import time
import warnings

import pytest
import torch
from conftest import save_results, spread

from ivl_fast.vocab import DEFAULT_TOP_K, EMPTY_PROB, VocabMap

ROWS: list[dict] = []
SHAPES = [(131072, 32000), (32000, 131072)]  # (V_base, V_value): tekken -> v1, v1 -> tekken


def _synthetic_map(v_base: int, v_value: int, k: int) -> VocabMap:
    """``k`` distinct value tokens per base token, weights summing to 1 per row (as a built map's)."""
    g = torch.Generator().manual_seed(0)
    cols = torch.stack([torch.randperm(v_value, generator=g)[:k] for _ in range(64)])  # [64, k] patterns
    cols = cols[torch.randint(0, 64, (v_base,), generator=g)].sort(dim=1).values.reshape(-1)
    val = torch.rand(v_base, k, generator=g)
    val = (val / val.sum(1, keepdim=True)).reshape(-1)
    crow = torch.arange(0, v_base * k + 1, k)
    return VocabMap(crow, cols, val, (v_base, v_value))


def _rebuilt_per_call(vmap: VocabMap, z: torch.Tensor) -> torch.Tensor:
    """The baseline: apply as it was, the sparse operand made, cast and transposed on every call."""
    w = vmap.to_torch_sparse().to(device=z.device, dtype=z.dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = (w.t() @ torch.softmax(z, dim=-1).t()).t()
    return torch.log(p.clamp_min(EMPTY_PROB))


def _ms(fn, iters: int = 10, repeats: int = 7) -> dict:
    fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        samples.append((time.perf_counter() - t0) / iters * 1e3)
    return spread(samples)


@pytest.mark.parametrize("b", [1, 8, 64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}to{s[1]}")
def test_map_apply_per_step(shape, b, benchmark):
    v_base, v_value = shape
    vmap = _synthetic_map(v_base, v_value, DEFAULT_TOP_K)
    z = torch.randn(b, v_base, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(vmap.apply(z), _rebuilt_per_call(vmap, z), atol=1e-5)  # the same product
    cached = _ms(lambda: vmap.apply(z))
    rebuilt = _ms(lambda: _rebuilt_per_call(vmap, z))
    nnz = int(vmap.col.numel())
    floor_bytes = 8 * b * v_base + 12 * nnz + 8 * (v_base + 1) + 8 * b * v_value
    row = {
        "v_base": v_base,
        "v_value": v_value,
        "top_k": DEFAULT_TOP_K,
        "batch": b,
        "nonzeros": nnz,
        "apply_ms": cached,
        "rebuilt_per_call_ms": rebuilt,
        "speedup": rebuilt["median"] / cached["median"],
        "floor_bytes": floor_bytes,
        "apply_gb_per_s": floor_bytes / (cached["median"] * 1e-3) / 1e9,
        "device": "cpu",
        "threads": torch.get_num_threads(),
    }
    ROWS.append(row)
    benchmark.pedantic(lambda: vmap.apply(z), rounds=1, iterations=1)
    save_results({"benchmark": "vocabulary map apply per step", "rows": ROWS})
    print(
        f"\nV {v_base}->{v_value} B={b}: apply {cached['median']:.2f} ms, rebuilt per call "
        f"{rebuilt['median']:.2f} ms ({row['speedup']:.1f}x), {row['apply_gb_per_s']:.1f} GB/s of the floor's bytes"
    )
