"""Per-token decode time: base alone vs the IVL pair (graph layouts, eager) vs the naive two-model HF loop.

Variants (same random-weight models: the lean engine shares the HF models' weights; same prompts; greedy, no EOS):
  base_alone       the base model alone through this engine (CUDA graphs when on GPU)
  pair_fused       the pair, one graph per step: base and value on two streams, joined before the sampler
  pair_two_stream  the pair, a graph per model replayed on two streams with events, then the sampler's graph
  pair_one_stream  the pair, one graph, everything sequential on one stream
  pair_eager       the pair without graphs
  pair_naive_hf    what the paper measured (1.79x the base alone): both HF models with their own caches, logits
                   added, argmax, one Python iteration per token
ms_per_token = wall time of a whole generate call (prefill included) / new tokens, the median of the timed calls
(IVL_BENCH_ROUNDS + 1 of them after the warm-up), with every call's time and the range beside it.
For the graph variants also: the achieved bandwidth (weights of both models + the KV columns read per decode step,
over the decode step time) as a fraction of a device-to-device copy measured in the same run, and the GPU idle
fraction between kernels (profiler, decode phase). The terminal summary prints the table; IVL_BENCH_SUMMARY=path
writes decode_summary.json (and a PNG next to it). NOT YET RUN ON GPU.
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch
from conftest import DECODE, bench_settings, load_config, random_hf

from ivl_fast import FastIVLDecoder
from ivl_fast.graphs import kv_bucket
from ivl_fast.models.hf_adapter import cache_kwarg

S = bench_settings()
VARIANTS = ["base_alone", "pair_fused", "pair_two_stream", "pair_one_stream", "pair_eager", "pair_naive_hf"]


_MODELS: dict = {}


def _models(pair: str):
    if pair not in _MODELS:
        _MODELS.clear()  # keep one pair on the device at a time
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        value_name, base_name = pair.split("+")
        dtype = getattr(torch, S["dtype"])
        base = random_hf(load_config(base_name), S["device"], dtype, 0)
        value = random_hf(load_config(value_name), S["device"], dtype, 1)
        _MODELS[pair] = (base, value)
    return _MODELS[pair]


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _prompt(vocab: int, batch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(10, vocab, (batch, S["prompt_len"]), generator=g).to(S["device"])


@torch.inference_mode()
def naive_hf_pair(base, value, ids: torch.Tensor, new: int) -> torch.Tensor:
    x, past_b, past_v, out = ids, None, None, []
    cache = cache_kwarg(base)  # `cache` from transformers 5.25, `past_key_values` before
    for _ in range(new):
        ob = base(input_ids=x, use_cache=True, **{cache: past_b})
        ov = value(input_ids=x, use_cache=True, **{cache: past_v})
        nxt = (ob.logits[:, -1].float() + ov.logits[:, -1].float()).argmax(-1, keepdim=True)
        past_b, past_v, x = ob[cache], ov[cache], nxt
        out.append(nxt)
    return torch.cat(out, 1)


def _decoder(base, value, variant: str) -> FastIVLDecoder:
    graphs = S["graphs"]
    if variant == "base_alone":
        return FastIVLDecoder(base, None, scheme="base", graphs=graphs)
    if variant == "pair_eager":
        return FastIVLDecoder(base, value, graphs="off")
    return FastIVLDecoder(base, value, graphs=graphs, graph_mode=variant.removeprefix("pair_"))


def _weight_bytes(engine) -> int:
    """Bytes of weights a decode step reads: everything but the input embedding (one row per token) unless
    the head is tied to it."""
    skip = set() if engine.lm_head is None else {id(engine.model.embed_tokens.weight)}
    return sum(p.numel() * p.element_size() for p in engine.parameters() if id(p) not in skip)


def _kv_bytes_per_step(engines, batch: int, t: int, new: int, capacity: int, block: int) -> float:
    """KV bytes read per decode step (the bucketed columns attended to), averaged over the steps."""
    cols = sum(kv_bucket(t + j, capacity, block) for j in range(1, new)) / max(1, new - 1)
    per_col = 0
    for m in engines:
        c = m.config
        per_col += c.num_layers * 2 * c.num_kv_heads * c.head_dim * m.dtype.itemsize
    return cols * per_col * batch


def idle_fraction(fn) -> float | None:
    """1 - (union of GPU activity intervals) / (window), over the last 75% of the device timeline of ``fn``
    (skipping prefill and capture-free warm steps)."""
    if not torch.cuda.is_available():
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        _sync()
    spans = sorted(
        (e.time_range.start, e.time_range.end)
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start
    )
    if len(spans) < 8:
        return None
    lo = spans[0][0] + 0.25 * (spans[-1][1] - spans[0][0])
    busy, cur_s, cur_e, first = 0.0, None, None, None
    for s, e in spans:
        if e <= lo:
            continue
        s = max(s, lo)
        first = s if first is None else first
        if cur_e is None or s > cur_e:
            busy += 0 if cur_e is None else cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    window = spans[-1][1] - first
    return max(0.0, 1 - busy / window)


@pytest.mark.parametrize("new", S["new_tokens"])
@pytest.mark.parametrize("batch", S["batches"])
@pytest.mark.parametrize("pair", S["pairs"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_decode(benchmark, pair, batch, new, variant):
    base, value = _models(pair)
    ids = _prompt(base.config.vocab_size, batch)
    dec = None
    if variant == "pair_naive_hf":
        fn = lambda: naive_hf_pair(base, value, ids, new)  # noqa: E731
    else:
        dec = _decoder(base, value, variant)
        fn = lambda: dec.generate(ids, max_new_tokens=new, eos_token_id=[])  # noqa: E731

    def timed():
        _sync()
        t0 = time.perf_counter()
        out = fn()
        _sync()
        return time.perf_counter() - t0, out

    t_first, out = timed()  # warm-up (graph captures happen here)
    rounds = [timed() for _ in range(S["rounds"])]
    secs = benchmark.pedantic(lambda: timed()[0], rounds=1, iterations=1)
    calls = [r[0] for r in rounds] + [secs]
    med = statistics.median(calls)
    rec = {
        "pair": pair,
        "batch": batch,
        "new_tokens": new,
        "variant": variant,
        "ms_per_token": med * 1e3 / new,
        "ms_per_token_range": [min(calls) * 1e3 / new, max(calls) * 1e3 / new],
        "seconds": med,
        "seconds_all": calls,
        "first_call_s": t_first,
    }
    if dec is not None:
        tm = rounds[-1][1].timings
        rec.update(graphs=tm["graphs"], prefill_s=tm["prefill_s"])
        decode_s = (tm["total_s"] - tm["prefill_s"]) / max(1, tm["steps"] - 1)
        wbytes = sum(_weight_bytes(m) for m in dec.engines)
        kv = _kv_bytes_per_step(
            dec.engines, batch, ids.shape[1], new, dec.cache_capacity(ids.shape[1] + new), dec.kv_block
        )
        rec.update(
            decode_step_ms=decode_s * 1e3, bytes_per_step=wbytes + kv, achieved_bytes_per_s=(wbytes + kv) / decode_s
        )
        if variant != "pair_eager":
            rec["idle_fraction"] = idle_fraction(lambda: dec.generate(ids, max_new_tokens=64, eos_token_id=[]))
        for m in dec.engines:
            m.free()
        dec.release_graphs()
    benchmark.extra_info.update({k: v for k, v in rec.items() if isinstance(v, int | float | str)})
    DECODE.append(rec)
