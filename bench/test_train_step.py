"""Tokens/s of one IVL training step (forward + fused loss + backward + AdamW) with random-weight models.

Default: TinyLlama-1.1B-shaped value network on a TinyLlama-shaped base on GPU (bf16 autocast), the tiny pair
on CPU. IVL_TRAIN_VALUE / IVL_TRAIN_BASE pick configs from bench/configs; IVL_TRAIN_B, IVL_TRAIN_T the batch;
IVL_TRAIN_ROUNDS the timed steps (default 7). ``IVL_BENCH_OUT=path.json`` writes every step's time, the median
and range of tokens/s, and the provenance.
"""

from __future__ import annotations

import os
import time

import torch
from conftest import load_config, save_results, spread

from ivl_fast.models import _build_lean
from ivl_fast.models.config import LeanConfig
from ivl_fast.train.trainer import TrainConfig, micro_batch_loss

GPU = torch.cuda.is_available()


def _random_lean(name: str, dtype, seed: int):
    cfg = LeanConfig.from_dict(load_config(name))
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        from ivl_fast.models.llama import LeanCausalLM

        shapes = {k: v.shape for k, v in LeanCausalLM(cfg).state_dict().items()}
    dev = "cuda" if GPU else "cpu"
    state = {k: (torch.randn(s, generator=g) * 0.02).to(dev, dtype) for k, s in shapes.items()}
    for k in state:
        if k.endswith("norm.weight"):
            state[k].fill_(1.0)
    return _build_lean(cfg, state, torch.device(dev), dtype, "sdpa")


def test_train_step_tokens_per_s(benchmark):
    vname = os.environ.get("IVL_TRAIN_VALUE", "tinyllama-1.1b" if GPU else "tiny-value")
    bname = os.environ.get("IVL_TRAIN_BASE", "tinyllama-1.1b" if GPU else "tiny-base")
    b, t = int(os.environ.get("IVL_TRAIN_B", "8")), int(os.environ.get("IVL_TRAIN_T", "1024" if GPU else "256"))
    value = _random_lean(vname, torch.float32, 0).requires_grad_(True).train()
    base = _random_lean(bname, torch.bfloat16 if GPU else torch.float32, 1)
    opt = torch.optim.AdamW(value.parameters(), lr=1e-4)
    dev = value.device
    ids = torch.randint(10, value.vocab_size, (b, t), device=dev)
    labels = ids.clone()
    labels[:, : t // 4] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    cfg = TrainConfig(bases=[bname], value_init=vname, data="-", out="-")

    def step():
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if GPU else torch.autocast("cpu", enabled=False)
        with ctx:
            loss, _ = micro_batch_loss(cfg, value, value, base, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if GPU:
            torch.cuda.synchronize()

    step()  # warm-up: allocator, autotuning
    rounds = int(os.environ.get("IVL_TRAIN_ROUNDS", "7"))
    seconds = []

    def timed_step():
        t0 = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - t0)

    benchmark.pedantic(timed_step, rounds=rounds, iterations=1)
    tokens_per_s = spread([b * t / s for s in seconds])
    config = {"value": vname, "base": bname, "batch": b, "seq": t, "device": str(dev)}
    benchmark.extra_info.update({**config, "tokens_per_s": tokens_per_s["median"]})
    print(
        f"\ntrain step {vname} on {bname}, {b}x{t}: {tokens_per_s['median']:.0f} tokens/s "
        f"(median of {rounds}; {tokens_per_s['min']:.0f}-{tokens_per_s['max']:.0f})"
    )
    save_results(
        {
            "benchmark": "one IVL training step: forward of both models + fused loss + backward + AdamW",
            "config": config,
            "seconds": spread(seconds),
            "tokens_per_s": tokens_per_s,
        }
    )
