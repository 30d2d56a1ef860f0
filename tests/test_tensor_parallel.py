"""Tensor parallelism (issue #20) on CPU: 2 processes under torchrun with gloo, against one process.

A grouped-query Llama base (4 query heads, 2 KV heads: split; and 1 KV head: replicated on both ranks) with a
value network: greedy completions equal one process's, sampled ones equal across ranks (and one process's, same
seed), each rank holds about half of the sharded weights. float32 (decoding's dtypes): the all-reduce sums in
another order, a difference of ~1e-7 that flips no greedy choice of these random models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_model

from ivl_fast import FastIVLDecoder
from ivl_fast.models.config import LeanConfig
from ivl_fast.models.tensor_parallel import shard_plan

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from tp_worker import PROMPTS  # noqa: E402


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(base: Path, value: Path, out: Path) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    cmd += ["--master_addr", "127.0.0.1", str(HERE / "tp_worker.py"), str(base), str(value), str(out)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return [json.loads((out / f"rank{i}.json").read_text()) for i in range(2)]


@pytest.mark.parametrize("kv_heads", [2, 1], ids=["kv-split", "kv-replicated"])
def test_two_ranks_decode_as_one_process(kv_heads, save_checkpoint, tmp_path):
    base = build_model("llama", seed=3, num_attention_heads=4, num_key_value_heads=kv_heads, hidden_size=64)
    value = build_model("llama", seed=4, num_attention_heads=4, num_key_value_heads=2)
    bdir, vdir = save_checkpoint(base, f"tp_base{kv_heads}"), save_checkpoint(value, "tp_value")
    ranks = _torchrun(bdir, vdir, tmp_path)
    one = FastIVLDecoder.from_pretrained(bdir, vdir, dtype="float32", device="cpu")
    greedy = one.generate(PROMPTS, max_new_tokens=12, do_sample=False, eos_token_id=[]).sequences.tolist()
    sampled = one.generate(
        PROMPTS, max_new_tokens=12, do_sample=True, temperature=1.0, top_p=0.95, seed=7, eos_token_id=[]
    ).sequences.tolist()
    for r in ranks:
        assert r["greedy"] == greedy, f"rank {r['rank']}"
        assert r["sampled"] == sampled, f"rank {r['rank']}"  # the same seed: the same draws as one process
        assert r["kv_heads_local"] == 1  # 2 KV heads: one each; 1 KV head: on both
    assert ranks[0]["sampled"] == ranks[1]["sampled"]
    # the gathered head: every rank holds the whole logits, equal to one process's
    hn = torch.zeros(1, 64, dtype=torch.float32) + 0.5
    want = one.models.base.project(hn)[0, :8].tolist()
    assert ranks[0]["head_probe"] == pytest.approx(want, abs=1e-6) and ranks[0]["head_probe"] == ranks[1]["head_probe"]
    # memory: each rank holds the replicated embedding and norms, and half of everything else (its query heads,
    # its one KV head, half the MLP features, half the head's rows)
    c = base.config
    h, d, inter, n_layers, vocab = (
        c.hidden_size,
        c.hidden_size // c.num_attention_heads,
        c.intermediate_size,
        2,
        c.vocab_size,
    )
    per_layer = h * 2 * d + 2 * h * d + 2 * d * h + 3 * h * inter // 2  # q, k + v (one head), o, gate + up + down
    want_bytes = 4 * (vocab * h + (2 * n_layers + 1) * h + n_layers * per_layer + vocab // 2 * h)
    full = sum(p.numel() * 4 for p in one.models.base.parameters())
    for r in ranks:
        assert r["base_param_bytes"] == want_bytes
        assert r["base_param_bytes"] < 0.8 * full


def test_shard_plans_split_heads_and_refuse_what_cannot_be_split():
    from conftest import tiny_config

    cfg = LeanConfig.from_dict(tiny_config(num_attention_heads=8, num_key_value_heads=2).to_dict())
    plans = [shard_plan(cfg, r, 4) for r in range(4)]
    assert [p.heads for p in plans] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    # KV head j serves query heads 4j..4j+3 (repeat_kv): ranks 0, 1 hold KV head 0, ranks 2, 3 KV head 1
    assert [p.kv_heads for p in plans] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    for p in plans:
        group = cfg.num_heads // cfg.num_kv_heads
        assert {q // group for q in range(*p.heads)} == set(range(*p.kv_heads))
    assert [p.intermediate for p in plans] == [(0, 40), (40, 80), (80, 120), (120, 160)]
    assert [p.vocab for p in plans] == [(0, 128), (128, 256), (256, 384), (384, 512)]
    odd = LeanConfig.from_dict(tiny_config(vocab_size=510).to_dict())
    assert [shard_plan(odd, r, 4).vocab for r in range(4)] == [(0, 128), (128, 256), (256, 384), (384, 510)]
    with pytest.raises(ValueError, match="tensor_parallel=3 must divide num_attention_heads=8"):
        shard_plan(cfg, 0, 3)
    gqa3 = LeanConfig.from_dict(tiny_config(num_attention_heads=6, num_key_value_heads=3, hidden_size=96).to_dict())
    with pytest.raises(ValueError, match="num_key_value_heads=3: one must divide the other"):
        shard_plan(gqa3, 0, 2)
    with pytest.raises(ValueError, match="must divide intermediate_size=150"):
        shard_plan(LeanConfig.from_dict(tiny_config(intermediate_size=150).to_dict()), 0, 4)


def test_tensor_parallel_refusals(pair):
    _, _, bdir, vdir = pair
    with pytest.raises(RuntimeError, match="needs an initialised process group"):
        FastIVLDecoder.from_pretrained(bdir, vdir, tensor_parallel=2)
    with pytest.raises(ValueError, match="tensor_parallel must be an integer >= 1"):
        FastIVLDecoder.from_pretrained(bdir, vdir, tensor_parallel=0)
    with pytest.raises(ValueError, match="needs the lean engine"):
        FastIVLDecoder.from_pretrained(bdir, vdir, tensor_parallel=2, engine="hf")


def test_a_tied_head_over_a_vocabulary_the_ranks_do_not_divide(save_checkpoint, tmp_path):
    """Tied embeddings (the head's rows sliced from the replicated embedding) and V = 515 (rank 1's head
    zero-padded to 258 rows, the padding cut off after the gather): still one process's ids."""
    base = build_model("llama", seed=5, vocab_size=515, tie_word_embeddings=True)
    value = build_model("llama", seed=6, vocab_size=515)
    bdir, vdir = save_checkpoint(base, "tp_tied_base"), save_checkpoint(value, "tp_tied_value")
    ranks = _torchrun(bdir, vdir, tmp_path)
    one = FastIVLDecoder.from_pretrained(bdir, vdir, dtype="float32", device="cpu")
    greedy = one.generate(PROMPTS, max_new_tokens=12, do_sample=False, eos_token_id=[]).sequences.tolist()
    assert ranks[0]["greedy"] == ranks[1]["greedy"] == greedy
    assert ranks[0]["head_probe"] == ranks[1]["head_probe"]


@pytest.fixture(scope="module")
def tp_pair(save_checkpoint):
    base = build_model("llama", seed=3, num_attention_heads=4, num_key_value_heads=2)
    value = build_model("llama", seed=4)
    return save_checkpoint(base, "tp_cli_base"), save_checkpoint(value, "tp_cli_value")


def test_cli_generate_under_torchrun_prints_what_one_process_prints(tp_pair, capsys):
    """`torchrun --nproc_per_node 2 -m ivl_fast.cli generate --tp 2 ...`: rank 0 prints the completions of one
    process (greedy), the other rank prints nothing."""
    from ivl_fast.cli import main as cli_main

    bdir, vdir = tp_pair
    flags = ["--base", str(bdir), "--value", str(vdir), "--prompt", "The statement", "--max-new-tokens", "10"]
    flags += ["--no-eos", "--json", "--device", "cpu"]
    assert cli_main(["generate", *flags]) == 0
    want = json.loads(capsys.readouterr().out)["outputs"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    cmd += ["--master_addr", "127.0.0.1", "-m", "ivl_fast.cli", "generate", "--tp", "2", *flags]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    printed = [line for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(printed) == 1  # rank 0 only
    assert json.loads(printed[0])["outputs"] == want


def test_cli_tp_refusals(pair, capsys):
    """Without torchrun, a bad N, and the subcommands that do not shard yet: refused, one line each."""
    from ivl_fast.cli import main as cli_main

    _, _, bdir, vdir = pair
    pair_flags = ["--base", str(bdir), "--value", str(vdir)]
    assert cli_main(["generate", *pair_flags, "--prompt", "x", "--tp", "2"]) == 2
    assert "--tp 2 needs 2 processes: run it as torchrun --nproc_per_node 2" in capsys.readouterr().err
    assert cli_main(["generate", *pair_flags, "--prompt", "x", "--tp", "0"]) == 2
    assert "--tp must be >= 1, got 0" in capsys.readouterr().err
    assert cli_main(["serve", *pair_flags, "--tp", "2"]) == 2
    assert "--tp is not implemented for this subcommand yet" in capsys.readouterr().err
    assert cli_main(["eval", *pair_flags, "--tasks", "x", "--tp", "2"]) == 2
    assert "--tp is not implemented for this subcommand yet" in capsys.readouterr().err
