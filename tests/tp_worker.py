"""One rank of the tensor-parallel tests (tests/test_tensor_parallel.py), run under torchrun on CPU with gloo:

    python -m torch.distributed.run --nproc_per_node 2 tests/tp_worker.py BASE VALUE OUT_DIR

Loads the base with tensor_parallel=2 and the value network replicated, decodes the prompts greedily and sampled
(seeded), and writes what it got to OUT_DIR/rank{R}.json: the ids, the first logits of the gathered head on a fixed
hidden state, the bytes of its base parameters and its number of KV heads.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

PROMPTS = [[1, 17, 42, 99, 7], [1, 5, 300]]


def main(base: str, value: str, out: str) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    from ivl_fast import FastIVLDecoder

    dec = FastIVLDecoder.from_pretrained(base, value, tensor_parallel=2, dtype="float32", device="cpu")
    greedy = dec.generate(PROMPTS, max_new_tokens=12, do_sample=False, eos_token_id=[]).sequences
    sampled = dec.generate(
        PROMPTS, max_new_tokens=12, do_sample=True, temperature=1.0, top_p=0.95, seed=7, eos_token_id=[]
    ).sequences
    engine = dec.models.base
    logits = engine.project(torch.zeros(1, engine.config.hidden_size, dtype=torch.float32) + 0.5)
    report = {
        "rank": rank,
        "greedy": greedy.tolist(),
        "sampled": sampled.tolist(),
        "head_probe": logits[0, :8].tolist(),
        "base_param_bytes": sum(p.numel() * p.element_size() for p in engine.parameters()),
        "kv_heads_local": engine.local_config.num_kv_heads,
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
