"""Memory per rank of a tensor-parallel base (issue #20): one process against 2 ranks under torchrun, CPU, gloo.

    python bench/tp_memory.py OUT.json

Builds a random Llama checkpoint of 155M parameters (hidden 1024, 8 layers, 16 query heads, 4 KV heads,
intermediate 2816, vocabulary 32000, fp32: 594 MiB of safetensors). Loads its base in a fresh process alone and in 2
ranks (``FastIVLDecoder.from_pretrained(..., tensor_parallel=2)``, with a small replicated value network), and
decodes one token, so that every weight has been read (a loaded tensor may be an untouched file mapping until
then). Reports per process: the base's parameter bytes; the resident memory the load and that token added (VmRSS
after minus before), and its anonymous part (RssAnon); the whole process's RSS split into anonymous and file pages.

On CPU the loaded tensors stay mappings of the safetensors file (RssFile), shared between the ranks through the page
cache, and a column slice (o_proj, down_proj) touches every row of its tensor; on a GPU each rank copies its slices
to its device, so its device memory is its parameter bytes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path


def _status(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def measure(base: str, value: str, tp: int, out: str) -> None:
    """One process's figures (under torchrun when tp > 1), appended to ``out`` as a JSON line."""
    import torch

    torch.set_num_threads(1)
    rank = 0
    if tp > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo")
        rank = dist.get_rank()
    from ivl_fast import FastIVLDecoder

    with open("/proc/self/clear_refs", "w") as f:  # reset the peak RSS to the current one
        f.write("5")
    before = _status("VmRSS")
    anon_before = _status("RssAnon")
    dec = FastIVLDecoder.from_pretrained(base, value, tensor_parallel=tp if tp > 1 else None, device="cpu")
    # one token decoded: every weight read once (a loaded tensor may still be an untouched file mapping)
    dec.generate([[1, 5, 9]], max_new_tokens=1, do_sample=False)
    row = {
        "tensor_parallel": tp,
        "rank": rank,
        "base_param_bytes": sum(p.numel() * p.element_size() for p in dec.models.base.parameters()),
        "load_rss_added_mb": (_status("VmRSS") - before) / 2**20,
        "load_anon_added_mb": (_status("RssAnon") - anon_before) / 2**20,
        "load_peak_added_mb": (_status("VmHWM") - before) / 2**20,
        "rss_mb": _status("VmRSS") / 2**20,  # the whole process after the load (torch, tokenizer, both models)
        "rss_anon_mb": _status("RssAnon") / 2**20,
        "rss_file_mb": _status("RssFile") / 2**20,
        "rss_before_load_mb": before / 2**20,
    }
    with open(out, "a") as f:
        f.write(json.dumps(row) + "\n")
    if tp > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


def main(out_json: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from ivl_fast.provenance import provenance
    from ivl_fast.tiny import llama_config, train_tokenizer

    here = Path(__file__).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        tok = train_tokenizer(512, max_chars=50_000)
        torch.manual_seed(0)
        cfg = llama_config(32000, hidden=1024, layers=8, heads=16, kv_heads=4, intermediate_size=2816)
        base = AutoModelForCausalLM.from_config(cfg)
        base.save_pretrained(f"{tmp}/base")
        tok.save_pretrained(f"{tmp}/base")
        del base
        value = AutoModelForCausalLM.from_config(llama_config(32000, hidden=64, layers=2, heads=4, kv_heads=2))
        value.save_pretrained(f"{tmp}/value")
        tok.save_pretrained(f"{tmp}/value")
        lines = f"{tmp}/rows.jsonl"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        args = [f"{tmp}/base", f"{tmp}/value"]
        subprocess.run([sys.executable, str(here), "--measure", *args, "1", lines], env=env, check=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        run = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
        run += ["--master_addr", "127.0.0.1", str(here), "--measure", *args, "2", lines]
        subprocess.run(run, env=env, check=True)
        rows = [json.loads(x) for x in Path(lines).read_text().splitlines()]
        file_mb = sum(p.stat().st_size for p in Path(f"{tmp}/base").glob("*.safetensors")) / 2**20
    one = next(r for r in rows if r["tensor_parallel"] == 1)
    ranks = sorted((r for r in rows if r["tensor_parallel"] == 2), key=lambda r: r["rank"])
    result = {
        "provenance": provenance("python bench/tp_memory.py " + " ".join(sys.argv[1:])),
        "benchmark": "memory per rank of a tensor-parallel base (CPU, gloo, 2 ranks)",
        "config": {"base": cfg.to_dict() | {"torch_dtype": "float32"}, "checkpoint_mb": file_mb},
        "one_process": one,
        "ranks": ranks,
        "param_bytes_per_rank_over_one_process": [r["base_param_bytes"] / one["base_param_bytes"] for r in ranks],
        "anon_added_per_rank_over_one_process": [r["load_anon_added_mb"] / one["load_anon_added_mb"] for r in ranks],
    }
    out_json.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("one_process", "ranks")}, indent=1))


if __name__ == "__main__":
    if sys.argv[1] == "--measure":
        measure(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
    else:
        main(Path(sys.argv[1]))
