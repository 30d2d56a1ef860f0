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
from torchrun_helpers import ENV, free_port, run_group, torchrun  # noqa: E402
from tp_worker import PROMPTS  # noqa: E402


def _torchrun(base: Path, value: Path, out: Path) -> list[dict]:
    r = run_group(torchrun(str(HERE / "tp_worker.py"), str(base), str(value), str(out)), ENV, 180)
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
    r = run_group(torchrun("-m", "ivl_fast.cli", "generate", "--tp", "2", *flags), ENV, 180)
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
    assert "--tp 2 needs 2 processes" in capsys.readouterr().err
    assert cli_main(["eval", *pair_flags, "--tasks", "x", "--tp", "2"]) == 2
    assert "--tp 2 needs 2 processes" in capsys.readouterr().err


def test_cli_eval_under_torchrun_reports_what_one_process_reports(tp_pair, tmp_path, capsys):
    """`torchrun --nproc_per_node 2 -m ivl_fast.cli eval --tp 2 ...` on local lm-eval tasks: rank 0 writes the
    results file of one process (the same metrics), and only one file is written."""
    pytest.importorskip("lm_eval")
    from lm_eval_tasks import write_tasks

    from ivl_fast.cli import main as cli_main

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_tasks(tasks)
    bdir, vdir = tp_pair
    flags = ["--base", str(bdir), "--value", str(vdir), "--tasks", "ivl_mc,ivl_gen", "--include-path", str(tasks)]
    flags += ["--limit", "4", "--batch-size", "2", "--device", "cpu", "--seed", "3"]
    one_dir, tp_dir = tmp_path / "one", tmp_path / "tp"
    one_dir.mkdir()
    tp_dir.mkdir()
    assert cli_main(["eval", *flags, "--output-path", str(one_dir)]) == 0
    capsys.readouterr()
    r = run_group(torchrun("-m", "ivl_fast.cli", "eval", "--tp", "2", *flags, "--output-path", str(tp_dir)), ENV, 300)
    assert r.returncode == 0, r.stderr[-3000:]
    (one_file,), (tp_file,) = list(one_dir.glob("*/results_*.json")), list(tp_dir.glob("*/results_*.json"))
    want, got = json.loads(one_file.read_text())["results"], json.loads(tp_file.read_text())["results"]
    assert set(got) == {"ivl_mc", "ivl_gen"}
    for task, metrics in want.items():
        for k, v in metrics.items():
            if isinstance(v, float):
                assert got[task][k] == pytest.approx(v, abs=1e-6), (task, k)
    assert r.stdout.count("|ivl_mc ") == 1  # rank 0's table only


def test_serve_under_torchrun_answers_as_one_process(tp_pair):
    """`torchrun --nproc_per_node 2 -m ivl_fast.cli serve --tp 2 ...` on loopback, with the official client: rank 0
    serves, rank 1 follows its batch. Greedy and seeded sampled completions, several at once (so rows join the batch
    while others decode), equal those of a one-process server; SIGTERM stops rank 0 gracefully and ends both."""
    import signal
    import time
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    from serve_fixtures import Server

    bdir, vdir = tp_pair
    flags = ["--base", str(bdir), "--value", str(vdir), "--device", "cpu", "--max-batch-size", "4"]
    flags += ["--served-model-name", "m"]
    asks = [
        dict(prompt=p, max_tokens=10, temperature=0.0)
        for p in ("def main", "The for statement", "import os", "class A:")
    ] + [dict(prompt="while True", max_tokens=10, temperature=1.0, seed=11)]

    def answers(client):
        with ThreadPoolExecutor(len(asks)) as pool:
            done = pool.map(lambda a: client.completions.create(model="m", **a).choices[0].text, asks)
            return list(done)

    one = Server(*flags)
    try:
        want = answers(one.client())
    finally:
        one.stop()
    port = free_port()
    cmd = torchrun("-m", "ivl_fast.cli", "serve", "--tp", "2", *flags, "--port", str(port))
    p = subprocess.Popen(
        cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert p.poll() is None, p.communicate()[1][-3000:]
            try:
                if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the tensor-parallel server did not start"
            time.sleep(0.5)
        import openai

        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
        assert answers(client) == want
        assert answers(client) == want  # again, on the batch's later rows
        p.send_signal(signal.SIGTERM)  # torchrun passes it on to both ranks: rank 0 stops, then rank 1
        _, err = p.communicate(timeout=60)
        assert "ivl-fast serve: stopped" in err, err[-3000:]
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
