"""The linear-probe value model (scheme "probe", paper Section 3.2): the Llama MLP on the base's final hidden
state, trained like a value network, saved and loaded as its own checkpoint, decoded (eager, emulated graphs,
continuous batches), scored; a base of another width is refused."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import build_model
from train_fixtures import make_train_setup, train_config

from ivl_fast import FastIVLDecoder
from ivl_fast.models.probe import ProbeValue
from ivl_fast.train import train_value_model


@pytest.fixture(scope="module")
def trained(tmp_path_factory, save_checkpoint):
    setup = make_train_setup(tmp_path_factory, save_checkpoint)
    out = tmp_path_factory.mktemp("probe") / "run"
    summary = train_value_model(
        train_config(setup, out, scheme="probe", value_init=str(setup["base"]), probe_intermediate_size=48)
    )
    return setup, out, summary


def _reference(base_hf, probe, ids, n, alpha=1.0):
    """Greedy from the definition: full forward of the transformers base each step, the probe written out."""
    ids = list(ids)
    out = []
    for _ in range(n):
        with torch.no_grad():
            o = base_hf(torch.tensor([ids]), output_hidden_states=True)
            h = o.hidden_states[-1][0, -1].double()  # transformers' last hidden state is already normed
            g, u, d, w = (getattr(probe, k).weight.double() for k in ("gate_proj", "up_proj", "down_proj", "lm_head"))
            delta = w @ (d @ (F.silu(g @ h) * (u @ h)))
            z = o.logits[0, -1].double() + alpha * delta
        out.append(int(z.argmax()))
        ids.append(out[-1])
    return out


def test_training_a_probe_lowers_the_loss_and_exports_a_probe_checkpoint(trained):
    setup, out, summary = trained
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert summary["steps"] == 24 and log[-1]["loss"] < log[0]["loss"]
    assert json.loads((out / "config.json").read_text())["model_type"] == "ivl_probe"
    assert json.loads((out / "ivl.json").read_text())["scheme"] == "probe"
    assert (out / "tokenizer.json").exists()


@pytest.fixture(scope="module")
def strong_probe(trained):
    """A probe with random weights big enough to change the base's greedy tokens (the trained one is still close
    to its zero start after 24 steps), as the decoder is given it directly."""
    setup, _, _ = trained
    torch.manual_seed(7)
    probe = ProbeValue(96, 48, 512)
    with torch.no_grad():
        probe.lm_head.weight.mul_(40)
    return probe.eval()


@pytest.mark.parametrize("graphs", ["off", "emulate"])
def test_probe_decoding_equals_the_definition(trained, strong_probe, graphs):
    from transformers import AutoModelForCausalLM

    setup, out, _ = trained
    base_hf = AutoModelForCausalLM.from_pretrained(setup["base"]).eval()
    dec = FastIVLDecoder(base_hf, strong_probe, scheme="probe", graphs=graphs)
    prompts = [[1, 40, 41, 42, 43], [1, 90, 91]]
    got = dec.generate(prompts, max_new_tokens=8, eos_token_id=[])
    for i, p in enumerate(prompts):
        assert got.sequences[i, -8:].tolist() == _reference(base_hf, strong_probe, p, 8)
    alone = FastIVLDecoder(base_hf, None, scheme="base").generate(prompts, max_new_tokens=8, eos_token_id=[])
    assert not torch.equal(got.sequences, alone.sequences)  # the probe steers
    # a continuous batch (the server's): the same tokens
    batch = dec.open_batch(slots=2, max_seq_len=32, eos_token_id=[], per_request=True)
    slots = [batch.admit(p, 8) for p in prompts]
    while not all(batch.is_finished(s) for s in slots):
        batch.step()
    assert [batch.tokens(s) for s in slots] == [got.sequences[i, -8:].tolist() for i in range(2)]
    # alpha 0 is the base alone
    zero = FastIVLDecoder(base_hf, strong_probe, scheme="probe", alpha=0.0)
    assert torch.equal(zero.generate(prompts, max_new_tokens=8, eos_token_id=[]).sequences, alone.sequences)


def test_the_trained_probe_loads_from_its_checkpoint(trained):
    setup, out, _ = trained
    dec = FastIVLDecoder.from_pretrained(setup["base"], out)  # scheme from ivl.json
    assert dec.scheme == "probe" and isinstance(dec.value, ProbeValue)
    assert dec.value.lm_head.weight.abs().sum() > 0  # trained away from its zero start
    ids = [1, 40, 41, 42, 43]
    z = dec.generate([ids], max_new_tokens=1, eos_token_id=[], return_logprobs=True)
    assert z.sequences.shape[1] == len(ids) + 1


def test_probe_scoring_equals_the_definition(trained, strong_probe):
    from transformers import AutoModelForCausalLM

    setup, out, _ = trained
    dec = FastIVLDecoder(AutoModelForCausalLM.from_pretrained(setup["base"]).eval(), strong_probe, scheme="probe")
    ctx, cont = [1, 40, 41], [42, 7, 9]
    ((lp, _),) = dec.loglikelihood([(ctx, cont)])
    base_hf = AutoModelForCausalLM.from_pretrained(setup["base"]).eval()
    x = torch.tensor([ctx + cont[:-1]])
    with torch.no_grad():
        o = base_hf(x, output_hidden_states=True)
        z = o.logits[0].double() + dec.value.logits(o.hidden_states[-1][0]).double()
    logp = z[len(ctx) - 1 :].log_softmax(-1)
    assert abs(lp - sum(float(logp[i, t]) for i, t in enumerate(cont))) < 1e-3


def test_a_probe_does_not_move_to_a_base_of_another_width(trained, save_checkpoint):
    setup, out, _ = trained
    other = save_checkpoint(build_model("llama", seed=4, hidden_size=80, num_attention_heads=4), "probe-other")
    with pytest.raises(ValueError, match="a probe does not move to a base of another size"):
        FastIVLDecoder.from_pretrained(other, out)
    with pytest.raises(ValueError, match="decodes with scheme='probe' only"):
        FastIVLDecoder.from_pretrained(setup["base"], out, scheme="residual")
    with pytest.raises(ValueError, match="--probe-intermediate-size .* needs --scheme probe"):
        train_config(setup, out / "x", probe_intermediate_size=8).validate()


def test_the_cli_trains_and_decodes_a_probe(trained, tmp_path, capsys):
    from ivl_fast.cli import main

    setup, _, _ = trained
    out = tmp_path / "cli-probe"
    rc = main(
        ["train", "--base", str(setup["base"]), "--value-init", str(setup["base"]), "--data", str(setup["data"])]
        + ["--out", str(out), "--scheme", "probe", "--probe-intermediate-size", "32", "--max-steps", "3"]
        + ["--batch-tokens", "256", "--no-progress", "--loss-backend", "torch"]
    )
    assert rc == 0 and json.loads((out / "config.json").read_text())["intermediate_size"] == 32
    capsys.readouterr()
    rc = main(["generate", "--base", str(setup["base"]), "--value", str(out), "--prompt", "def", "--json"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["outputs"][0]["text"] is not None
