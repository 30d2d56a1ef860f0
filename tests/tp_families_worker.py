"""One rank of the family tensor-parallel test (tests/test_model_families.py), under torchrun on CPU with gloo:

    python -m torch.distributed.run --nproc_per_node 2 tests/tp_families_worker.py OUT_DIR NAME=BASE,VALUE ...

For each pair: the base sharded over the 2 ranks, the value network replicated; greedy ids of the prompts written
to OUT_DIR/rank{R}.json as {name: ids}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def main(out: str, *pairs: str) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    from parity import FAMILY_PROMPTS as PROMPTS

    from ivl_fast import FastIVLDecoder

    got = {}
    for pair in pairs:
        name, dirs = pair.split("=", 1)
        base, value = dirs.split(",")
        dec = FastIVLDecoder.from_pretrained(base, value, tensor_parallel=2, dtype="float32", device="cpu")
        got[name] = dec.generate(PROMPTS, max_new_tokens=14, do_sample=False, eos_token_id=[]).sequences.tolist()
    Path(out, f"rank{dist.get_rank()}.json").write_text(json.dumps(got))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
