"""Value-network training end to end on real tiny checkpoints, real tokenizer, real JSONL files (CPU)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_model
from train_fixtures import cli_args as _cli_args
from train_fixtures import conversations as _conversations
from train_fixtures import make_train_setup
from train_fixtures import train_config as _cfg
from train_fixtures import write_jsonl as _write_jsonl

from ivl_fast import FastIVLDecoder
from ivl_fast.cli import main as cli_main
from ivl_fast.train import build_dataset, make_batches, read_conversations, train_value_model
from ivl_fast.train import trainer as trainer_mod
from ivl_fast.train.data import IGNORE, DataError, Example, collate, padding_fraction, tokenize_conversation


@pytest.fixture(scope="module")
def setup(tmp_path_factory, save_checkpoint):
    return make_train_setup(tmp_path_factory, save_checkpoint)


@pytest.fixture(scope="module")
def hf_models(setup):
    """The fixture's base and value init as transformers models, by dtype: the references below run these,
    never ivl_fast's own engine."""
    from transformers import AutoModelForCausalLM

    def load(path, dtype, grad):
        return AutoModelForCausalLM.from_pretrained(path).to(dtype).eval().requires_grad_(grad)

    return {
        dt: (load(setup["base"], dt, False), load(setup["small"], dt, True)) for dt in (torch.float32, torch.float64)
    }


def _greedy_pair_reference(base_hf, value_hf, ids, steps, *, scheme="residual", eos=None):
    """Greedy IVL decoding by full recompute with transformers models: argmax(z_base + z_delta) each step; the
    cascade value network reads softmax(z_base) @ E_value (+ E_value[token] for cascade+), built in float64."""
    seq = list(ids)
    for _ in range(steps):
        x = torch.tensor([seq])
        with torch.no_grad():
            zb = base_hf(x).logits  # [1, T, V]
            if scheme == "residual":
                zv = value_hf(x).logits
            else:
                e = value_hf.get_input_embeddings().weight.double()  # [V, H]
                emb = zb.double().softmax(-1) @ e
                if scheme == "cascade+":
                    emb = emb + e[x]
                zv = value_hf(inputs_embeds=emb.to(value_hf.dtype)).logits
        seq.append(int((zb[0, -1].double() + zv[0, -1].double()).argmax()))
        if seq[-1] == eos:
            break
    return seq[len(ids) :]


def _ivl_loss_reference(base_hf, value_hf, examples, l1, scheme="residual"):
    """The training loss from its definition, example by example (no padding) with transformers models at their
    dtype: the mean over every supervised token of all ``examples`` of CE(z_base + z_delta) + l1 * mean_v |z_delta|,
    token t predicted from position t - 1."""
    total, n = 0.0, 0
    for ex in examples:
        ids = torch.tensor([ex.input_ids])
        lab = torch.tensor(ex.labels[1:])
        keep = lab != IGNORE
        with torch.no_grad():
            zb = base_hf(ids).logits[0]  # [T, V]
        if scheme == "residual":
            zv = value_hf(ids).logits[0]
        else:
            e = value_hf.get_input_embeddings().weight
            emb = zb.softmax(-1) @ e + (e[ids[0]] if scheme == "cascade+" else 0)
            zv = value_hf(inputs_embeds=emb[None]).logits[0]
        z = (zb + zv)[:-1][keep]
        nll = -(z - z.logsumexp(-1, keepdim=True))[torch.arange(z.shape[0]), lab[keep]]
        total = total + (nll + l1 * zv[:-1][keep].abs().sum(-1) / zv.shape[-1]).sum()
        n += int(keep.sum())
    return total / n


def _reference_grads(value_hf, loss):
    names = [k for k, _ in value_hf.named_parameters()]
    return loss.detach(), dict(zip(names, torch.autograd.grad(loss, list(value_hf.parameters())), strict=True))


def _rel_err(got: dict, ref: dict) -> float:
    """Relative Frobenius error of all gradients together (parameter names as in the HF checkpoint)."""
    assert got.keys() == ref.keys()
    missing = [k for k in ref if got[k] is None]
    assert not missing, f"no gradient reached {missing}"
    num = sum(((got[k].double() - ref[k].double()) ** 2).sum() for k in ref)
    return float((num / sum((ref[k].double() ** 2).sum() for k in ref)).sqrt())


def _ragged_examples():
    """Four examples whose supervised token counts differ a lot: micro-batches of 2, 15 and 9 tokens below. The
    first is supervised from its second token on (labels[1] counts: no prompt beyond the BOS)."""
    rng = random.Random(0)
    out = []
    for length, sup in [(3, 2), (20, 14), (12, 1), (16, 9)]:
        ids = [1] + [rng.randrange(4, 512) for _ in range(length - 1)]
        out.append(Example(ids, [IGNORE] * (length - sup) + ids[length - sup :]))
    return out


def _train_models(setup, checkpointing=False):
    from ivl_fast.models import load_model

    value = load_model(setup["small"], dtype="float32", engine="lean").requires_grad_(True).train()
    value.gradient_checkpointing = checkpointing
    base = load_model(setup["base"], dtype="float32", engine="lean").requires_grad_(False).eval()
    return value, base


class _GradCapture(torch.optim.Optimizer):
    """A real optimizer whose step only records the gradients it was handed (the trainer zeroes them after)."""

    def __init__(self, named):
        named = list(named)
        self.names = [k for k, _ in named]
        super().__init__([p for _, p in named], {})
        self.grads = None

    def step(self, closure=None):
        params = self.param_groups[0]["params"]
        self.grads = {k: p.grad.detach().clone() for k, p in zip(self.names, params, strict=True)}


# ----------------------------------------------------------------------------- data
def test_sharegpt_and_openai_forms_give_identical_examples(setup, tokenizer, tmp_path):
    convs = _conversations(5, seed=3)
    a = build_dataset(tokenizer, _write_jsonl(tmp_path / "a.jsonl", convs, "openai"))
    b = build_dataset(tokenizer, _write_jsonl(tmp_path / "b.jsonl", convs, "sharegpt"))
    assert [(e.input_ids, e.labels) for e in a.examples] == [(e.input_ids, e.labels) for e in b.examples]
    # a JSON array works too
    (tmp_path / "c.json").write_text(json.dumps([{"messages": c} for c in convs]))
    c = build_dataset(tokenizer, tmp_path / "c.json")
    assert [e.input_ids for e in c.examples] == [e.input_ids for e in a.examples]


def test_labels_cover_exactly_the_assistant_turns(tokenizer):
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": "Hi there."},
        {"role": "user", "content": "Again."},
        {"role": "assistant", "content": "Hello."},
    ]
    ex = tokenize_conversation(tokenizer, msgs)
    labelled = [t for t in ex.labels if t != IGNORE]
    text = tokenizer.decode(labelled)
    # both assistant answers (with the EOS that ends each turn), nothing of the user or system turns
    assert "Hi there." in text and "Hello." in text and text.count("</s>") == 2
    assert "Say hi" not in text and "Be brief" not in text and "Again" not in text
    assert len(ex.labels) == len(ex.input_ids)


def test_malformed_line_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"messages": _conversations(1)[0]}) + "\n{not json\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: malformed JSON"):
        read_conversations(p)
    p.write_text(json.dumps({"messages": [{"role": "alien", "content": "x"}]}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: turn 0 has unknown role 'alien'"):
        read_conversations(p)


def test_skipped_truncated_and_dropped_are_counted(tokenizer, tmp_path):
    convs = _conversations(4) + [[{"role": "user", "content": "no answer here"}]]
    convs.append([{"role": "user", "content": "long " * 10}, {"role": "assistant", "content": "x " * 80}])
    p = _write_jsonl(tmp_path / "m.jsonl", convs)
    ds = build_dataset(tokenizer, p, max_length=64)
    assert ds.stats.skipped_no_assistant == 1 and ds.stats.truncated == 1 and ds.stats.used == 5
    assert all(len(e.input_ids) <= 64 for e in ds.examples)
    # an over-long conversation whose assistant turn is cut away entirely cannot teach anything: dropped
    gone = _write_jsonl(tmp_path / "g.jsonl", convs[:4] + [[{"role": "user", "content": "y " * 90}, convs[5][1]]])
    assert build_dataset(tokenizer, gone, max_length=64).stats.dropped_too_long == 1
    dropped = build_dataset(tokenizer, p, max_length=64, drop_long=True)
    assert dropped.stats.dropped_too_long == 1 and dropped.stats.used == 4


def test_length_grouped_batches_pad_less_than_ten_percent():
    rng = random.Random(0)
    lengths = [rng.randint(20, 400) for _ in range(2000)]
    batches = make_batches(lengths, 4096, seed=0, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(2000))  # every example exactly once
    assert all(len(b) * max(lengths[i] for i in b) <= 4096 for b in batches)
    assert padding_fraction(batches, lengths) < 0.10
    assert make_batches(lengths, 4096, seed=0, epoch=0) == batches  # deterministic
    assert make_batches(lengths, 4096, seed=0, epoch=1) != batches  # reshuffled per epoch


# ----------------------------------------------------------------------------- end to end
def test_train_end_to_end_loss_decreases_and_output_loads(setup, tmp_path):
    out = tmp_path / "run"
    summary = train_value_model(_cfg(setup, out))
    assert summary["steps"] == 24
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 25)) and all("loss" in r for r in log)
    first, last = sum(r["loss"] for r in log[:4]) / 4, sum(r["loss"] for r in log[-4:]) / 4
    assert last < 0.7 * first, (first, last)
    assert (out / "loss_curve.png").stat().st_size > 1000
    meta = json.loads((out / "ivl.json").read_text())
    assert meta["scheme"] == "residual" and meta["l1"] == 1.0 and meta["bases"] == [str(setup["base"])]
    assert len(meta["data_hash"]) == 64

    # transformers loads it, and its logits are the trained lean model's
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    dec = FastIVLDecoder.from_pretrained(setup["base"], out)
    ids = torch.tensor([[1, 50, 60, 70]])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, dec.value(ids), rtol=1e-4, atol=1e-4)
    text = dec.generate_text("What is 3 plus 4?", chat=True, max_new_tokens=8)
    # the reference: DEFAULT_CHAT_TEMPLATE's documented format (the tokenizer has no template of its own), greedy
    # decoding with the two transformers models until EOS, the continuation decoded without special tokens
    tok = dec.tokenizer
    prompt = tok("<s><|user|>\nWhat is 3 plus 4?\n<|assistant|>\n", add_special_tokens=False)["input_ids"]
    assert prompt[0] == tok.bos_token_id
    new_ids = _greedy_pair_reference(
        AutoModelForCausalLM.from_pretrained(setup["base"]).eval(), hf, prompt, 8, eos=tok.eos_token_id
    )
    assert text == tok.decode(new_ids, skip_special_tokens=True)


def test_trained_value_network_steers_the_base(setup, tmp_path):
    """The trained pair assigns the demonstrated answers a higher likelihood than the base alone."""
    out = tmp_path / "steer"
    train_value_model(_cfg(setup, out, max_steps=40))
    from ivl_fast.models import load_model
    from ivl_fast.train.data import build_dataset as bd

    tok = FastIVLDecoder.from_pretrained(setup["base"], out).tokenizer
    ds = bd(tok, setup["data"])
    base, value = load_model(setup["base"]), load_model(out)
    ex = ds.examples[0]
    ids = torch.tensor([ex.input_ids])
    lab = torch.tensor(ex.labels[1:])
    keep = lab != IGNORE
    zb = base(ids)[0, :-1][keep]
    zv = value(ids)[0, :-1][keep]
    nll_base = torch.nn.functional.cross_entropy(zb, lab[keep])
    nll_pair = torch.nn.functional.cross_entropy(zb + zv, lab[keep])
    assert nll_pair < nll_base


def test_resume_after_kill_gives_identical_weights(setup, tmp_path):
    """A run SIGKILLed mid-way and resumed ends with the same weights as an uninterrupted run (CPU)."""
    from safetensors.torch import load_file

    common = _cli_args(setup, max_steps=12, save_every=4)
    full = tmp_path / "full"
    assert cli_main(common + ["--out", str(full)]) == 0
    cut = tmp_path / "cut"
    cmd = [sys.executable, "-m", "ivl_fast.cli", *common, "--out", str(cut), "--debug-kill-at-step", "6"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]  # really killed
    state = json.loads((cut / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 4  # the last checkpoint before the kill
    assert not (cut / "model.safetensors").exists()
    # resuming without --resume is refused: the directory holds a run
    assert cli_main(common + ["--out", str(cut)]) == 2
    assert cli_main(common + ["--out", str(cut), "--resume"]) == 0
    a, b = load_file(str(full / "model.safetensors")), load_file(str(cut / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(x)["step"] for x in (cut / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))


def test_ddp_and_fsdp_two_processes_equal_one_process_with_same_global_batch(setup, tmp_path):
    """torchrun with 2 CPU processes (gloo), grad_accum 1 == 1 process with grad_accum 2; DDP and FSDP."""
    from safetensors.torch import load_file

    common = _cli_args(setup, max_steps=5, save_every=0)
    single = tmp_path / "single"
    assert cli_main(common + ["--grad-accum", "2", "--out", str(single)]) == 0
    ddp = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(29500 + os.getpid() % 1000),
        "-m",
        "ivl_fast.cli",
        *common,
        "--grad-accum",
        "1",
        "--out",
        str(ddp),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = load_file(str(single / "model.safetensors")), load_file(str(ddp / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    la = [json.loads(x)["loss"] for x in (single / "train_log.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (ddp / "train_log.jsonl").read_text().splitlines()]
    assert la == pytest.approx(lb, rel=1e-5)
    assert json.loads((ddp / "ivl.json").read_text())["summary"]["world_size"] == 2

    # FSDP (FSDP2 fully_shard over gloo): same result again, and a checkpoint gathered from the shards
    fsdp = tmp_path / "fsdp"
    cmd_fsdp = [x if x != str(ddp) else str(fsdp) for x in cmd] + ["--fsdp", "--save-every", "5"]
    cmd_fsdp[cmd_fsdp.index("--master_port") + 1] = str(29500 + os.getpid() % 1000 + 1)
    proc = subprocess.run(cmd_fsdp, capture_output=True, text=True, timeout=600, env=env)
    if torch.__version__ < "2.6":  # the lowest-versions stage: torch 2.5's FSDP2 needs CUDA, refused up front
        assert proc.returncode != 0 and "--fsdp on cpu needs torch >= 2.6" in proc.stderr, proc.stderr[-3000:]
        assert not (fsdp / "model.safetensors").exists()
        return
    assert proc.returncode == 0, proc.stderr[-3000:]
    c = load_file(str(fsdp / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], c[k], rtol=1e-4, atol=1e-5, msg=k)
    assert (fsdp / "checkpoint" / "model.safetensors").is_file()


@pytest.mark.parametrize("scheme", ["cascade", "cascade+"])
def test_cascade_schemes_train_and_decode_exactly(setup, tmp_path, scheme):
    out = tmp_path / scheme
    train_value_model(_cfg(setup, out, scheme=scheme, max_steps=6))
    dec = FastIVLDecoder.from_pretrained(setup["base"], out)  # scheme read from ivl.json
    assert dec.scheme == scheme
    prompts = [[1, 40, 41, 42, 43], [1, 90, 91]]
    got = dec.generate(prompts, max_new_tokens=10, eos_token_id=[])
    t = got.prompt_length
    # reference: full recompute each step with the transformers models, the value network reading
    # softmax(z_base) @ E (+ E[token]) written out in float64 (not the engine's soft_embed)
    from transformers import AutoModelForCausalLM

    base_hf = AutoModelForCausalLM.from_pretrained(setup["base"]).eval()
    value_hf = AutoModelForCausalLM.from_pretrained(out).eval()
    for i, p in enumerate(prompts):
        assert got.sequences[i, t:].tolist() == _greedy_pair_reference(base_hf, value_hf, p, 10, scheme=scheme)


def test_curriculum_trains_on_each_base_in_turn(setup, tmp_path, save_checkpoint):
    base2 = save_checkpoint(build_model("llama", seed=5, hidden_size=80, num_attention_heads=4), "tbase2")
    out = tmp_path / "curr"
    summary = train_value_model(_cfg(setup, out, bases=[str(setup["base"]), str(base2)], max_steps=5))
    assert summary["steps"] == 10
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in log] == [0] * 5 + [1] * 5
    assert len(json.loads((out / "ivl.json").read_text())["bases"]) == 2


# ----------------------------------------------------------------------------- loss weighting, checkpointing
def test_micro_batches_weight_every_supervised_token_equally(setup, hf_models):
    """One optimizer step over three micro-batches of 2, 15 and 9 supervised tokens (one of them padded): the
    logged loss and the gradient handed to the optimizer are those of one big batch with every token weighted
    equally, against that definition in float64; the allowance is 2x the error of the same reference in fp32."""
    examples, group = _ragged_examples(), [[0], [1, 2], [3]]
    counts = [sum(x != IGNORE for i in b for x in examples[i].labels[1:]) for b in group]
    assert counts == [2, 15, 9]  # test design: a mean of micro-batch means would weight a token 1/6 vs 1/45
    value, base = _train_models(setup)
    opt = _GradCapture(value.named_parameters())
    cfg = _cfg(setup, setup["dir"] / "unused", max_grad_norm=0.0)  # no clipping: the optimizer sees the raw gradient
    loss, _, n_tok = trainer_mod._optimizer_step(cfg, examples, group, 3, (0, 1, None), value, value, base, opt, None)
    assert n_tok == sum(len(e.input_ids) for e in examples)  # what train_log's tokens column adds up: no padding

    ref_loss, ref = _reference_grads(
        hf_models[torch.float64][1], _ivl_loss_reference(*hf_models[torch.float64], examples, 1.0)
    )
    p_loss, plain = _reference_grads(
        hf_models[torch.float32][1], _ivl_loss_reference(*hf_models[torch.float32], examples, 1.0)
    )
    eps = torch.finfo(torch.float32).eps  # floor: the loss is an fp32 sum of three micro-batch terms (a few ulps)
    assert abs(loss - ref_loss.item()) <= max(2 * abs(p_loss.item() - ref_loss.item()), 8 * eps * ref_loss.item())
    assert _rel_err(opt.grads, ref) <= max(2 * _rel_err(plain, ref), 1e-6)


@pytest.mark.parametrize("scheme", ["residual", "cascade", "cascade+"])
def test_gradient_checkpointing_recomputes_layers_and_keeps_the_gradients(setup, hf_models, scheme):
    """With checkpointing each decoder layer runs again in backward (so its activations were not kept), and the
    value network's gradients are still the definition's: within 2x the error of the run without it (fp64 ref)."""
    examples = _ragged_examples()[1:3]
    batch = collate(examples, pad_id=3)
    cfg = _cfg(setup, setup["dir"] / "unused", scheme=scheme)
    grads, calls = {}, {}
    for ckpt in (False, True):
        value, base = _train_models(setup, checkpointing=ckpt)
        calls[ckpt] = 0

        def count(*_, key=ckpt):
            calls[key] += 1

        for layer in value.model.layers:
            # a pre-hook: the non-reentrant recompute stops as soon as it has the tensors backward needs, before
            # a forward hook would fire
            layer.register_forward_pre_hook(count)
        loss, _ = trainer_mod.micro_batch_loss(cfg, value, value, base, batch)
        loss.backward()
        grads[ckpt] = {k: p.grad for k, p in value.named_parameters()}
    n_layers = len(value.model.layers)
    assert calls == {False: n_layers, True: 2 * n_layers}
    base64, value64 = hf_models[torch.float64]
    _, ref = _reference_grads(value64, _ivl_loss_reference(base64, value64, examples, 1.0, scheme))
    _, plain = _reference_grads(
        hf_models[torch.float32][1], _ivl_loss_reference(*hf_models[torch.float32], examples, 1.0, scheme)
    )
    # without checkpointing the gradients are the definition's (for cascade+: the soft input plus the token
    # embedding), within 2x plain fp32 torch's error; with it, within 2x the error without it
    assert _rel_err(grads[False], ref) <= max(2 * _rel_err(plain, ref), 1e-6)
    assert _rel_err(grads[True], ref) <= max(2 * _rel_err(grads[False], ref), 1e-6)


# ----------------------------------------------------------------------------- bad input
def test_vocabulary_mismatch_is_refused(setup, save_checkpoint, tmp_path):
    # fewer rows than the tokenizer's 512 ids: another vocabulary (more rows are padding: one vocabulary, trained in
    # tests/test_same_family_pairs.py)
    other = save_checkpoint(build_model("llama", seed=2, vocab_size=400), "v400")
    with pytest.raises(ValueError, match="same vocabulary"):
        train_value_model(_cfg(setup, tmp_path / "x", bases=[str(other)]))


def test_failed_checkpoint_write_keeps_the_previous_one(setup, tmp_path, monkeypatch):
    out = tmp_path / "diskfull"
    import safetensors.torch as st

    real = st.save_file
    calls = {"n": 0}

    def flaky(tensors, filename, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint: write half a file, then fail like a full disk
            Path(filename).write_bytes(b"partial")
            raise OSError(28, "No space left on device")
        return real(tensors, filename, *a, **k)

    monkeypatch.setattr(st, "save_file", flaky)
    with pytest.raises(OSError, match="No space left"):
        train_value_model(_cfg(setup, out, max_steps=16, save_every=4))
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 4
    assert real is not None and st.load_file(str(out / "checkpoint" / "model.safetensors"))
    assert not list(out.glob(".checkpoint.tmp-*"))  # the temp dir was cleaned up
    monkeypatch.setattr(st, "save_file", real)
    summary = train_value_model(_cfg(setup, out, max_steps=16, save_every=4, resume=True))
    assert summary["resumed_from"] == 4 and summary["steps"] == 16


def test_bad_training_arguments(setup, tmp_path):
    with pytest.raises(ValueError, match="scheme must be one of"):
        train_value_model(_cfg(setup, tmp_path / "a", scheme="stacked"))
    with pytest.raises(ValueError, match=r"--lr \(lr\) must be > 0, got 0"):
        train_value_model(_cfg(setup, tmp_path / "b", lr=0))
    with pytest.raises(FileNotFoundError, match="data file"):
        train_value_model(_cfg(setup, tmp_path / "c", data=str(tmp_path / "missing.jsonl")))
    assert trainer_mod.SCHEMES == ("residual", "cascade", "cascade+", "probe")


@pytest.mark.parametrize("per_step", [1, 2, 3])
def test_step_plan_survives_epochs_with_different_batch_counts(per_step):
    """Epochs reshuffle, so their batch counts differ (521 vs 520 here); every step must get full groups."""
    from ivl_fast.train.trainer import StepPlan

    rng = random.Random(0)
    lengths = [rng.randint(20, 600) for _ in range(3000)]
    plan = StepPlan(lengths, 2048, seed=1, per_step=per_step)
    counts = {len(plan.batches(e)) for e in range(3)}
    assert len(counts) > 1, "test design: the epochs should differ in batch count"
    total = plan.steps_in_epochs(3)
    seen_epochs = []
    for step in range(total):
        epoch, group = plan.group(step)
        assert len(group) == per_step and all(group)
        seen_epochs.append(epoch)
    assert seen_epochs == sorted(seen_epochs) and set(seen_epochs) == {0, 1, 2}
    small = StepPlan(lengths[:3], 4096, seed=0, per_step=8)
    msg = (
        f"the data make {len(small.batches(0))} micro-batches per epoch but one optimizer step needs "
        "world_size x grad_accum = 8; lower --grad-accum or --batch-tokens"
    )
    with pytest.raises(ValueError) as err:  # the whole message: it tells the user what to change
        small.epoch_steps(0)
    assert str(err.value) == msg


def test_fsdp_with_cascade_is_refused(setup, tmp_path):
    with pytest.raises(ValueError, match="--fsdp needs several processes"):
        train_value_model(_cfg(setup, tmp_path / "f", fsdp=True))
