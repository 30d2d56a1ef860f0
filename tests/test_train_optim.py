"""The optimizer side of value-network training, each checked on a real run of the tiny models against a reference
written from the definition: the learning-rate schedule (warmup, cosine, curriculum restarts), gradient clipping,
the weight-decay groups and the AdamW update they feed.

What each optimizer step saw is recorded by train_fixtures.record_run, which wraps the real parts of the run (a real
AdamW subclass snapshots parameters and gradients; the real model loader and loss are called through): nothing of
the trainer is replaced.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import build_model
from train_fixtures import ReferenceGradients, clip_by_hand, cpu_config, make_train_setup, max_err, named, record_run


@pytest.fixture(scope="module")
def setup(tmp_path_factory, save_checkpoint):
    s = make_train_setup(tmp_path_factory, save_checkpoint)
    # a Qwen2 value init: its q/k/v projections have biases, so the decay rule meets 1-D parameters of both kinds
    s["qwen"] = save_checkpoint(build_model("qwen2", seed=3), "tqwen")
    return s


# ----------------------------------------------------------------------------- references from the definitions
def reference_lr(peak: float, n_steps: int, warmup_ratio: float) -> list[float]:
    """The learning rate of optimizer steps 1..n (README: "warmup 4%, cosine"; config: warmup_ratio of the steps).

    W = floor(warmup_ratio * n) warmup steps; step k <= W uses k/W of the peak (the ramp reaches the peak at step W,
    no step runs at lr 0); after it, a half cosine from the peak (step W + 1) toward 0 (reached at step n + 1, one
    past the end: no floor, and the last step still learns a little).
    """
    w = math.floor(warmup_ratio * n_steps)
    out = []
    for k in range(1, n_steps + 1):
        if k <= w:
            out.append(peak * k / w)
        else:
            out.append(peak * 0.5 * (1 + math.cos(math.pi * (k - 1 - w) / (n_steps - w))))
    return out


def decays(name: str) -> bool:
    """The weight-decay rule: matrices (projections, embeddings, LM head) decay; norm gains and biases do not."""
    return not (name.endswith(".bias") or "norm" in name)


def adamw_by_hand(p, g, state, lr, wd, betas, eps):
    """One AdamW step (Loshchilov & Hutter, decoupled decay), in the dtype of its inputs."""
    b1, b2 = betas
    t = state["t"] = state.get("t", 0) + 1
    m = state["m"] = b1 * state.get("m", torch.zeros_like(p)) + (1 - b1) * g
    v = state["v"] = b2 * state.get("v", torch.zeros_like(p)) + (1 - b2) * g * g
    m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
    return p * (1 - lr * wd) - lr * m_hat / (v_hat.sqrt() + eps)


# ----------------------------------------------------------------------------- 1. the learning-rate schedule
@pytest.mark.parametrize("n_steps, warmup_ratio", [(12, 0.25), (10, 0.0)])
def test_lr_of_every_step_is_linear_warmup_then_cosine_to_zero(setup, tmp_path, monkeypatch, n_steps, warmup_ratio):
    out = tmp_path / "run"
    rec = record_run(monkeypatch, cpu_config(setup, out, max_steps=n_steps, warmup_ratio=warmup_ratio, save_every=0))
    want = reference_lr(1e-3, n_steps, warmup_ratio)
    assert len(rec.steps) == n_steps
    assert all(len({g[0] for g in s["groups"]}) == 1 for s in rec.steps)  # decay and no-decay groups share the lr
    assert [s["groups"][0][0] for s in rec.steps] == pytest.approx(want, rel=1e-12, abs=0)
    # train_log.jsonl's "lr" of step k is the lr step k ran with (not the next step's)
    assert [r["lr"] for r in rec.log] == pytest.approx(want, rel=1e-12, abs=0)


def test_each_curriculum_stage_restarts_warmup_and_cosine_with_a_fresh_optimizer(setup, tmp_path, monkeypatch):
    bases = [str(setup["base"]), str(setup["small"])]
    cfg = cpu_config(setup, tmp_path / "curr", bases=bases, max_steps=5, warmup_ratio=0.4, save_every=0)
    rec = record_run(monkeypatch, cfg)
    want = reference_lr(1e-3, 5, 0.4) * 2
    assert [s["groups"][0][0] for s in rec.steps] == pytest.approx(want, rel=1e-12, abs=0)
    assert [r["lr"] for r in rec.log] == pytest.approx(want, rel=1e-12, abs=0)
    # stage 2 steps a new AdamW (its moments start from zero), not the first stage's
    assert [s["opt"] for s in rec.steps] == [0] * 5 + [1] * 5
    assert rec.optimizers[1].state_dict()["state"][0]["step"] == 5


# ----------------------------------------------------------------------------- 2.-3. clipping, decay groups, AdamW
MAX_NORM, WD = 0.5, 0.1


@pytest.fixture(scope="module")
def clipped_run(setup, tmp_path_factory):
    """3 steps of 2 accumulated micro-batches each, clipping to 0.5 and weight decay 0.1, Qwen2 value init."""
    out = tmp_path_factory.mktemp("clip") / "run"
    cfg = cpu_config(
        setup,
        out,
        value_init=str(setup["qwen"]),
        max_steps=3,
        grad_accum=2,
        max_grad_norm=MAX_NORM,
        weight_decay=WD,
        save_every=0,
    )
    with pytest.MonkeyPatch.context() as mp:
        rec = record_run(mp, cfg)
    rec.cfg = cfg
    return rec


def test_optimizer_sees_the_definitions_gradients_scaled_to_max_grad_norm(setup, clipped_run):
    """Per step: the gradient of the global batch's token-mean loss (both micro-batches), computed with
    transformers in float64, clipped by hand, equals what AdamW received; the log's grad_norm is the norm before."""
    rec = clipped_run
    ref64 = ReferenceGradients(setup["base"], setup["qwen"], torch.float64)
    ref32 = ReferenceGradients(setup["base"], setup["qwen"], torch.float32)
    assert len(rec.steps) == 3 and all(len(s["batches"]) == 2 for s in rec.steps)
    for s, logged in zip(rec.steps, rec.log, strict=True):
        before = named(rec, s["before"])
        g64, norm64 = clip_by_hand(ref64(before, s["batches"], rec.cfg.l1)[1], MAX_NORM)
        g32, norm32 = clip_by_hand(ref32(before, s["batches"], rec.cfg.l1)[1], MAX_NORM)
        assert norm64 > 2 * MAX_NORM, "test design: clipping must be active"
        torch_err = max_err(g32, g64)  # plain torch float32 against float64
        got = named(rec, s["grad"])
        assert got.keys() == g64.keys()
        assert max_err(got, g64) <= max(2 * torch_err, 1e-9), (max_err(got, g64), torch_err)
        clipped_norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in got.values()))
        assert clipped_norm == pytest.approx(MAX_NORM, rel=1e-5)
        # the logged norm is a float32 number: a floor of 4 float32 ulps
        assert logged["grad_norm"] == pytest.approx(norm64, rel=max(2 * abs(norm32 - norm64) / norm64, 2**-21))


def test_weight_decay_goes_to_matrices_only_and_adamw_applies_it(clipped_run):
    """Decay groups by name against the rule; every step's update against AdamW written out in float64 (decoupled
    decay lr * wd * p on the decayed group only); zero-gradient embedding rows shrink by exactly that factor."""
    rec = clipped_run
    s0 = rec.steps[0]
    wd_of = {rec.names[i]: wd for (_, wd, _, _, ids) in s0["groups"] for i in ids}
    assert wd_of.keys() == {n for n, _ in rec.value.named_parameters()}  # every parameter is optimized, once
    assert sum(len(ids) for *_, ids in s0["groups"]) == len(wd_of)
    assert {n for n, wd in wd_of.items() if wd == WD} == {n for n in wd_of if decays(n)}
    assert {n for n, wd in wd_of.items() if wd == 0.0} == {n for n in wd_of if not decays(n)}
    assert any(n.endswith(".bias") for n in wd_of) and any("norm" in n for n in wd_of)  # test design
    betas, eps = s0["groups"][0][2], s0["groups"][0][3]
    assert (betas, eps) == ((0.9, 0.999), 1e-8)  # plain AdamW (the paper's Table 5): torch's defaults

    # the update: AdamW written out in float64 from the grads the optimizer received, vs a fresh torch AdamW in
    # float32 as the plain-torch baseline (same parameters each step, moments carried over). A decay wrongly given
    # to the norm gains (~1) or biases would put them lr * wd >= 2.5e-5 off, against errors of ~6e-8.
    lrs = reference_lr(rec.cfg.lr, 3, rec.cfg.warmup_ratio)
    names = list(wd_of)
    first = named(rec, s0["before"])
    base32 = {n: torch.zeros_like(first[n], requires_grad=True) for n in names}
    torch_opt = torch.optim.AdamW(
        [
            {"params": [base32[n] for n in names if decays(n)], "weight_decay": WD},
            {"params": [base32[n] for n in names if not decays(n)], "weight_decay": 0.0},
        ],
        lr=lrs[0],
    )
    state = {n: {} for n in names}
    emb = "model.embed_tokens.weight"
    unseen = torch.ones(rec.value.model.embed_tokens.weight.shape[0], dtype=torch.bool)
    for k, s in enumerate(rec.steps):
        before, grad, after = named(rec, s["before"]), named(rec, s["grad"]), named(rec, s["after"])
        want = {
            n: adamw_by_hand(
                before[n].double(), grad[n].double(), state[n], lrs[k], WD if decays(n) else 0.0, betas, eps
            )
            for n in names
        }
        with torch.no_grad():
            for n in names:
                base32[n].copy_(before[n])
                base32[n].grad = grad[n].clone()
        for g in torch_opt.param_groups:
            g["lr"] = lrs[k]
        torch_opt.step()
        torch_err = max_err({n: base32[n].detach() for n in names}, want)
        assert max_err(after, want) <= max(2 * torch_err, 1e-12), (k, max_err(after, want), torch_err)

        # embedding rows of tokens no batch so far contained have zero gradients and zero moments: they move by
        # exactly lr * wd * p
        unseen &= (grad[emb] == 0).all(dim=1)
        assert unseen.sum() > 100, "test design: most of the 512 tokens never occur in the demonstrations"
        # (compared as p * (1 - lr * wd) to within 2 float32 ulps; no decay would be >= 200 ulps away)
        kept, moved = before[emb][unseen].double(), after[emb][unseen].double()
        torch.testing.assert_close(moved, kept * (1 - lrs[k] * WD), rtol=2**-22, atol=0)
