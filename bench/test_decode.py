"""Per-token decode time: base alone vs the IVL pair (this engine) vs the naive two-model transformers loop.

The naive loop is what the paper measured (1.79x the base alone): both HF models with their own caches, logits
added, argmax, one Python iteration per token. All variants use the same random-weight models (the lean engine
shares the HF models' weight tensors), the same prompts and greedy decoding without EOS.
"""

from __future__ import annotations

import time

import pytest
import torch
from conftest import RESULTS, bench_settings, load_config

from ivl_fast import FastIVLDecoder

S = bench_settings()


def _random_hf(cfg: dict, device: str, dtype: torch.dtype, seed: int):
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


_MODELS: dict = {}


def _models(pair: str):
    if pair not in _MODELS:
        _MODELS.clear()  # keep one pair on the device at a time
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        value_name, base_name = pair.split("+")
        dtype = getattr(torch, S["dtype"])
        base = _random_hf(load_config(base_name), S["device"], dtype, 0)
        value = _random_hf(load_config(value_name), S["device"], dtype, 1)
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
    for _ in range(new):
        ob = base(input_ids=x, past_key_values=past_b, use_cache=True)
        ov = value(input_ids=x, past_key_values=past_v, use_cache=True)
        nxt = (ob.logits[:, -1].float() + ov.logits[:, -1].float()).argmax(-1, keepdim=True)
        past_b, past_v, x = ob.past_key_values, ov.past_key_values, nxt
        out.append(nxt)
    return torch.cat(out, 1)


def _record(benchmark, pair, batch, variant, seconds):
    ms = seconds * 1e3 / S["new_tokens"]
    benchmark.extra_info.update({"ms_per_token": ms, "tokens_per_s": batch * S["new_tokens"] / seconds})
    RESULTS.append({"pair": pair, "batch": batch, "variant": variant, "ms_per_token": ms, "seconds": seconds})


@pytest.mark.parametrize("batch", S["batches"])
@pytest.mark.parametrize("pair", S["pairs"])
@pytest.mark.parametrize("variant", ["base", "pair", "naive_hf_pair"])
def test_decode(benchmark, pair, batch, variant):
    base, value = _models(pair)
    ids = _prompt(base.config.vocab_size, batch)
    n = S["new_tokens"]
    if variant == "naive_hf_pair":
        fn = lambda: naive_hf_pair(base, value, ids, n)  # noqa: E731
    else:
        dec = FastIVLDecoder(
            base, value if variant == "pair" else None, scheme="residual" if variant == "pair" else "base"
        )
        fn = lambda: dec.generate(ids, max_new_tokens=n, eos_token_id=[])  # noqa: E731

    def timed():
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        return time.perf_counter() - t0

    timed()  # warm-up
    secs = benchmark.pedantic(timed, rounds=3, iterations=1)
    _record(benchmark, pair, batch, variant, min(benchmark.stats.stats.data) if benchmark.stats else secs)
