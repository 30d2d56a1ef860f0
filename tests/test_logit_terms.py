"""Logit arithmetic over several same-vocabulary models: z = z_base + alpha * z_value + sum_i w_i * z_i (proxy
tuning, DExperts), in the fused kernel (interpreter on CPU) and the torch reference, and through the decoder."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import build_model

from ivl_fast import FastIVLDecoder
from ivl_fast.ops.combine_and_sample import combine_and_sample

warnings.filterwarnings("ignore", category=RuntimeWarning)  # numpy log(0) inside the interpreter
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the kernel compiled on a GPU, else interpreted


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_terms_add_their_weighted_logits_before_sampling(backend):
    g = torch.Generator().manual_seed(0)
    b, v = 6, 300
    zb, zv, t1, t2 = (torch.randn(b, v, generator=g) * 3 for _ in range(4))
    t2 = t2.to(torch.bfloat16)  # a term in another dtype than the others
    want = zb.double() + 0.7 * zv.double() - 1.0 * t1.double() + 0.25 * t2.double()
    dev = KERNEL_DEVICE if backend == "triton" else "cpu"
    zb, zv, t1, t2 = (t.to(dev) for t in (zb, zv, t1, t2))
    ids, lp, bad = combine_and_sample(
        zb,
        zv,
        alpha=0.7,
        terms=[t1, t2],
        term_weights=[-1.0, 0.25],
        backend=backend,
        return_logprobs=True,
    )
    ids, lp, bad = ids.cpu(), lp.cpu(), bad.cpu()
    assert ids.tolist() == want.argmax(-1).tolist() and not bad.any()
    torch.testing.assert_close(lp.double(), want.log_softmax(-1).gather(1, ids[:, None])[:, 0], atol=1e-4, rtol=0)
    # weights as a device tensor (what the decoder keeps, graph-safe), sampling with top_k = 1
    w = torch.tensor([-1.0, 0.25], device=dev)
    ids2 = combine_and_sample(
        zb,
        zv,
        alpha=0.7,
        terms=[t1, t2],
        term_weights=w,
        backend=backend,
        do_sample=True,
        top_k=1,
        seed=3,
        generator=torch.Generator(device=dev).manual_seed(1),
    )[0]
    assert ids2.cpu().tolist() == ids.tolist()


def test_bad_terms_are_refused_naming_them():
    z = torch.randn(2, 10)
    with pytest.raises(ValueError, match="terms and term_weights go together"):
        combine_and_sample(z, z, terms=[z])
    with pytest.raises(ValueError, match=r"term_weights has 2 weight\(s\) for 1 term\(s\)"):
        combine_and_sample(z, z, terms=[z], term_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match=r"terms\[0\] must be \[B=2, V=10\]"):
        combine_and_sample(z, z, terms=[torch.randn(2, 11)], term_weights=[1.0])
    with pytest.raises(ValueError, match="term_weights must be finite"):
        combine_and_sample(z, z, terms=[z], term_weights=[float("nan")])


@pytest.fixture(scope="module")
def trio():
    """(large, small_tuned, small): three same-vocabulary transformers models with random weights."""
    return (
        build_model("llama", seed=0, hidden_size=96, num_attention_heads=6, num_key_value_heads=3),
        build_model("llama", seed=1),
        build_model("llama", seed=2),
    )


PROMPTS = [[1, 5, 9, 22, 7], [1, 40, 41]]


def _reference(models_weights, prompt, n):
    """Greedy decoding from the definition: argmax of sum_i w_i * logits_i, one full forward per step."""
    ids = list(prompt)
    for _ in range(n):
        x = torch.tensor([ids])
        with torch.no_grad():
            z = sum(w * m(x).logits[0, -1].double() for m, w in models_weights)
        ids.append(int(z.argmax()))
    return ids[len(prompt) :]


@pytest.mark.parametrize("graphs,backend", [("off", "torch"), ("emulate", "torch"), ("off", "triton")])
def test_greedy_with_logit_terms_equals_the_definition(trio, graphs, backend):
    large, tuned, small = trio
    dec = FastIVLDecoder(large, tuned, alpha=0.8, terms=[(small, -0.8)], graphs=graphs, sample_backend=backend)
    out = dec.generate(PROMPTS, max_new_tokens=8, eos_token_id=[])
    for r, p in enumerate(PROMPTS):
        want = _reference([(large, 1.0), (tuned, 0.8), (small, -0.8)], p, 8)
        assert out.sequences[r, -8:].tolist() == want
    # a continuous batch (what the server runs) gives the same tokens
    batch = dec.open_batch(slots=2, max_seq_len=32, eos_token_id=[], per_request=True)
    slots = [batch.admit(p, 8) for p in PROMPTS]
    while not all(batch.is_finished(s) for s in slots):
        batch.step()
    assert [batch.tokens(s) for s in slots] == [out.sequences[r, -8:].tolist() for r in range(2)]


def test_the_base_scheme_with_logit_terms_equals_the_definition(trio):
    """Scheme "base" (no value network) with terms: z_base + sum_i w_i * z_i, the terms run where the value network
    would (the step's other side)."""
    large, tuned, small = trio
    dec = FastIVLDecoder(large, None, scheme="base", terms=[(tuned, 0.7), (small, -0.7)])
    out = dec.generate(PROMPTS, max_new_tokens=6, eos_token_id=[])
    for r, p in enumerate(PROMPTS):
        assert out.sequences[r, -6:].tolist() == _reference([(large, 1.0), (tuned, 0.7), (small, -0.7)], p, 6)


def test_proxy_tuning_with_a_tuned_model_equal_to_its_untuned_self_is_the_base_alone(trio):
    """z_large + (z_small - z_small) = z_large: the tuned side cancels exactly enough to leave the base's tokens."""
    large, _, small = trio
    proxy = FastIVLDecoder(large, small, terms=[(small, -1.0)])
    alone = FastIVLDecoder(large, None, scheme="base")
    a = proxy.generate(PROMPTS, max_new_tokens=10, eos_token_id=[]).sequences
    b = alone.generate(PROMPTS, max_new_tokens=10, eos_token_id=[]).sequences
    assert torch.equal(a, b)


def test_scoring_with_logit_terms(trio):
    """loglikelihood under z_base + alpha z_value + sum_i w_i z_i, against the transformers models directly."""
    large, tuned, small = trio
    dec = FastIVLDecoder(large, tuned, alpha=0.5, terms=[(small, -0.5)])
    ctx, cont = [1, 5, 9, 22], [7, 30, 2]
    ((lp, greedy),) = dec.loglikelihood([(ctx, cont)])
    x = torch.tensor([ctx + cont[:-1]])
    with torch.no_grad():
        z = large(x).logits.double() + 0.5 * tuned(x).logits.double() - 0.5 * small(x).logits.double()
    logp = z[0, len(ctx) - 1 :].log_softmax(-1)
    want = sum(float(logp[i, t]) for i, t in enumerate(cont))
    assert abs(lp - want) < 1e-3
    assert greedy == all(int(logp[i].argmax()) == t for i, t in enumerate(cont))


def test_logit_terms_from_checkpoints_and_the_cli(trio, save_checkpoint, capsys):
    import json

    from ivl_fast.cli import main

    large, tuned, small = trio
    dirs = [save_checkpoint(m, n) for m, n in ((large, "pt-large"), (tuned, "pt-tuned"), (small, "pt-small"))]
    dec = FastIVLDecoder.from_pretrained(dirs[0], dirs[1], terms=[(dirs[2], -1.0)])
    want = dec.generate_text("def main", max_new_tokens=6)
    rc = main(
        ["generate", "--base", str(dirs[0]), "--value", str(dirs[1]), "--term", str(dirs[2]), "-1"]
        + ["--prompt", "def main", "--max-new-tokens", "6", "--json"]
    )
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["outputs"][0]["text"] == want
    rc = main(
        ["generate", "--base", str(dirs[0]), "--value", str(dirs[1]), "--term", str(dirs[2]), "x", "--prompt", "a"]
    )
    assert rc == 2 and "--term" in capsys.readouterr().err


def test_what_logit_terms_cannot_be_combined_with_is_refused(trio):
    large, tuned, small = trio
    with pytest.raises(ValueError, match="scheme 'residual' or 'base'"):
        FastIVLDecoder(large, tuned, scheme="cascade", terms=[(small, -1.0)])
    with pytest.raises(ValueError, match="vocabulary"):
        FastIVLDecoder(large, tuned, terms=[(build_model("llama", seed=3, vocab_size=300), -1.0)])
    with pytest.raises(ValueError, match="weight must be a finite number"):
        FastIVLDecoder(large, tuned, terms=[(small, float("inf"))])
    with pytest.raises(ValueError, match="a draft model and logit terms"):
        FastIVLDecoder(large, tuned, terms=[(small, -1.0)], draft_model=small)


def test_lm_eval_model_args_take_terms(trio, save_checkpoint):
    """lm-eval's 'ivl' model with model_args terms=DIR@WEIGHT scores as the decoder with those terms does."""
    from ivl_fast.lm_eval import IVLLM

    large, tuned, small = trio
    dirs = [save_checkpoint(m, n) for m, n in ((large, "le-large"), (tuned, "le-tuned"), (small, "le-small"))]
    lm = IVLLM(base=str(dirs[0]), value=str(dirs[1]), terms=f"{dirs[2]}@-1.0")
    dec = FastIVLDecoder.from_pretrained(dirs[0], dirs[1], terms=[(dirs[2], -1.0)])
    reqs = [("def main", " return"), ("import", " os")]
    assert [lp for lp, _ in dec.loglikelihood(reqs)] == pytest.approx(
        [lp for lp, _ in lm.dec.loglikelihood(reqs)], abs=1e-6
    )
    assert lm.dec.models.terms and lm.dec.models.terms[0][1] == -1.0
    with pytest.raises(ValueError, match="model_args terms must be 'DIR@WEIGHT"):
        IVLLM(base=str(dirs[0]), value=str(dirs[1]), terms="nodir")


def test_top_alternatives_of_a_batch_with_logit_terms_are_the_definitions(trio):
    """open_batch(top_logprobs=2) on a decoder with a logit term: each new token's alternatives are the top 2 of
    log_softmax(z_large + 0.8 z_tuned - 0.8 z_small) (recomputed with the transformers models), the term included."""
    large, tuned, small = trio
    dec = FastIVLDecoder(large, tuned, alpha=0.8, terms=[(small, -0.8)])
    batch = dec.open_batch(slots=1, max_seq_len=32, eos_token_id=[], per_request=True, top_logprobs=2)
    p = PROMPTS[0]
    slot = batch.admit(p, 5, top_logprobs=2)
    while not batch.is_finished(slot):
        batch.step()
    (new,) = batch.read_new([slot], [0], 8, top_logprobs=2)
    ids = torch.tensor([p + new.ids])
    with torch.no_grad():
        z = large(ids).logits + 0.8 * tuned(ids).logits - 0.8 * small(ids).logits
    want_lp, want_ids = z[0, len(p) - 1 : -1].log_softmax(-1).topk(2, dim=-1)  # [5, 2]
    assert [[i for i, _ in alt] for alt in new.alternatives] == want_ids.tolist()
    got_lp = torch.tensor([[lp for _, lp in alt] for alt in new.alternatives])
    torch.testing.assert_close(got_lp, want_lp, atol=1e-4, rtol=0)
