"""Decode speed of the demo's large + value pair (random weights of the demo's shapes: base 4 x 128, value
2 x 64, 600 tokens, fp32) at batch 1 and 8, greedy, 32 new tokens, EOS off: best of 5 timed calls after a
warm-up. Run once per source tree to compare two trees on one machine (the decode-core refactor's before/after):

    PYTHONPATH=<tree> python bench/decode_core_speed.py OUT.json

It prints one JSON object (tokens/s per batch size, best and all runs, and the aten ops one decode step
dispatches: counted over 24 and 8 new tokens, the difference over 16) and writes it to OUT.json.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class _CountOps(TorchDispatchMode):
    """Counts the aten ops dispatched inside it."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def ops_per_step(dec, prompts) -> float:
    """Aten ops of one decode step: (ops of 24 new tokens - ops of 8) / 16, so prefill and setup cancel."""
    counts = []
    for n in (8, 24):
        with _CountOps() as c:
            dec.generate(prompts, max_new_tokens=n, eos_token_id=[])
        counts.append(c.n)
    return (counts[1] - counts[0]) / 16


def main(out: str) -> None:
    import ivl_fast
    from ivl_fast import FastIVLDecoder
    from ivl_fast.tiny import llama_config, save_random_model

    vocab = 600
    with tempfile.TemporaryDirectory() as d:
        shapes = {"large": (128, 4, 4, 2), "value": (64, 2, 2, 1)}
        dirs = {}
        for i, (name, (hidden, layers, heads, kv)) in enumerate(shapes.items()):
            cfg = llama_config(
                vocab, hidden=hidden, layers=layers, heads=heads, kv_heads=kv, max_position_embeddings=256
            )
            dirs[name] = save_random_model(cfg, Path(d) / name, seed=i)
        dec = FastIVLDecoder.from_pretrained(dirs["large"], dirs["value"])
        result = {"tree": str(Path(ivl_fast.__file__).parent.parent), "torch": torch.__version__, "runs": {}}
        for batch in (1, 8):
            prompts = [[5 + (7 * r + j) % 500 for j in range(6 + r % 3)] for r in range(batch)]
            dec.generate(prompts, max_new_tokens=4, eos_token_id=[])  # warm-up
            runs = []
            for _ in range(5):
                t0 = time.perf_counter()
                dec.generate(prompts, max_new_tokens=32, eos_token_id=[])
                runs.append(batch * 32 / (time.perf_counter() - t0))
            result["runs"][f"batch_{batch}"] = {
                "best_tokens_per_s": max(runs),
                "tokens_per_s": runs,
                "aten_ops_per_step": ops_per_step(dec, prompts),
            }
    text = json.dumps(result, indent=1)
    Path(out).write_text(text)
    print(text)


if __name__ == "__main__":
    main(sys.argv[1])
