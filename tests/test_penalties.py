"""Repetition / presence / frequency penalties: the torch reference (ivl_fast.sampling.apply_penalties) against
transformers' own RepetitionPenaltyLogitsProcessor (bit for bit) and a float64 definition of the OpenAI / vLLM
formula; the fused Triton kernel (interpreter on CPU) against the reference (greedy exact, logprobs at fp32
tolerance, sampling by distribution against tests/sampling_oracle.py fed the penalized logits); designed rows
where each penalty (and its exact rule: once per token, over the generated ids only, in vLLM's order) flips the
greedy choice; and the refused inputs, each naming the argument.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter

import pytest
import torch
from sampling_oracle import assert_distinguishes, assert_matches_distribution, distinguishes, warped_probs64
from transformers import RepetitionPenaltyLogitsProcessor

from ivl_fast.ops.combine_and_sample import combine_and_sample
from ivl_fast.sampling import SamplingParams, apply_penalties, validate_sampling
from ivl_fast.vocab import VocabMap

warnings.filterwarnings("ignore", category=RuntimeWarning)  # numpy log(0) inside the interpreter

EPS32 = 2.0**-24  # fp32 unit roundoff


def _history(b: int, v: int, seed: int, n_prompt: int = 12, n_gen: int = 10):
    """Seeded prompt ids [b, n_prompt] and generated ids [b, n_gen]; the generated ids come from a narrow range (and
    repeat the prompt's first id) so tokens occur several times and in both parts."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, v, (b, n_prompt), generator=g)
    gen = torch.randint(0, 8, (b, n_gen), generator=g)
    gen[:, 0] = prompt[:, 0]
    return prompt, gen


def _state(prompt: torch.Tensor, gen: torch.Tensor, v: int):
    """The decoder's view of the history: prompt_mask [B, V] bool, output_counts [B, V] int32."""
    b = prompt.shape[0]
    mask = torch.zeros(b, v, dtype=torch.bool).scatter_(1, prompt, True)
    counts = torch.zeros(b, v, dtype=torch.int32).scatter_add_(1, gen, torch.ones_like(gen, dtype=torch.int32))
    return mask, counts


def _rows(p, b: int) -> list[float]:
    return p.double().tolist() if isinstance(p, torch.Tensor) else [float(p)] * b


def penalized64(z: torch.Tensor, prompt: torch.Tensor, gen: torch.Tensor, rep=1.0, pres=0.0, freq=0.0):
    """The definition, in Python floats: every token seen in prompt + generated ids (once is enough) gets
    z * rep if z < 0 else z / rep; then z[v] -= freq * count[v] + pres * (count[v] > 0) over the generated ids."""
    b, v = z.shape
    rep, pres, freq = _rows(rep, b), _rows(pres, b), _rows(freq, b)
    out = torch.empty(b, v, dtype=torch.float64)
    for r in range(b):
        seen = set(prompt[r].tolist()) | set(gen[r].tolist())
        count = Counter(gen[r].tolist())
        for t, x in enumerate(z[r].double().tolist()):
            if t in seen:
                x = x * rep[r] if x < 0 else x / rep[r]
            out[r, t] = x - (freq[r] * count[t] + pres[r] * (count[t] > 0))
    return out


def _log_softmax64(z: torch.Tensor) -> torch.Tensor:
    m = z.amax(-1, keepdim=True)
    return z - m - (z - m).exp().sum(-1, keepdim=True).log()


# ---------------------------------------------------------------------------------------------------------------
# the torch reference
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("penalty", [0.5, 0.9, 1.3, 2.0])
def test_repetition_reference_equals_transformers_processor_bit_for_bit(penalty):
    b, v = 4, 64
    z = torch.randn(b, v, generator=torch.Generator().manual_seed(1)) * 3
    z[:, :4] = torch.tensor([0.0, -0.0, -2.5, 2.5])  # zeros of both signs, and a negative / positive pair seen
    prompt, gen = _history(b, v, seed=2)
    prompt[:, 1:5] = torch.arange(4)  # the designed entries are in the prompt
    mask, counts = _state(prompt, gen, v)
    assert (counts > 1).any() and (mask & (counts > 0)).any()  # test design: repeats, and ids in both parts
    seen = mask | (counts > 0)
    assert (z[seen] < 0).any() and (z[seen] > 0).any()
    expected = RepetitionPenaltyLogitsProcessor(penalty)(torch.cat([prompt, gen], 1), z.clone())
    out = apply_penalties(z, mask, counts, repetition_penalty=penalty)
    assert torch.equal(out, expected)
    assert not torch.equal(out, z)
    # per-row [B] tensor: each row as transformers does it with that row's penalty
    per_row = torch.tensor([penalty, 1.0, 1.7, 0.6])
    out = apply_penalties(z, mask, counts, repetition_penalty=per_row)
    for r in range(b):
        proc = RepetitionPenaltyLogitsProcessor(float(per_row[r]))
        assert torch.equal(out[r : r + 1], proc(torch.cat([prompt, gen], 1)[r : r + 1], z[r : r + 1].clone())), r
    assert torch.equal(out[1], z[1])  # a row at 1.0 is unchanged, bit for bit


def _fp32_bound(z, counts, rep, pres, freq) -> torch.Tensor:
    """Elementwise rounding bound [B, V] of the fp32 computation: a few unit roundoffs of each term's size."""
    col = lambda p: torch.tensor(_rows(p, z.shape[0]), dtype=torch.float64)[:, None]  # noqa: E731
    size = z.double().abs() * torch.maximum(col(rep), 1 / col(rep)) + (col(freq) * counts).abs() + col(pres).abs()
    return 4 * EPS32 * size + 1e-30


@pytest.mark.parametrize(
    "rep, pres, freq",
    [
        (1.0, 0.7, 0.0),
        (1.0, 0.0, 0.45),
        (1.0, -1.5, 2.0),
        (1.3, 0.5, 0.25),  # all three: repetition first, then frequency and presence
        (torch.tensor([1.0, 0.8, 1.5]), torch.tensor([0.0, 2.0, -0.3]), torch.tensor([0.0, -2.0, 0.9])),
    ],
)
def test_reference_equals_the_float64_definition(rep, pres, freq):
    b, v = 3, 80
    z = torch.randn(b, v, generator=torch.Generator().manual_seed(3)) * 3
    prompt, gen = _history(b, v, seed=4)
    mask, counts = _state(prompt, gen, v)
    z[:, gen[:, 1]] = 0.2  # small positive logits of generated tokens: the order (repetition first) matters there
    exact = penalized64(z, prompt, gen, rep, pres, freq)
    out = apply_penalties(z, mask, counts, rep, pres, freq)
    assert out.dtype == torch.float32
    err = (out.double() - exact).abs()
    assert bool((err <= _fp32_bound(z, counts, rep, pres, freq)).all()), f"max error {err.max():.3g}"
    # presence / frequency never look at the prompt: a prompt of every token changes only the repetition part
    if not isinstance(rep, torch.Tensor) and rep == 1.0:
        assert torch.equal(apply_penalties(z, torch.ones_like(mask), counts, rep, pres, freq), out)


# ---------------------------------------------------------------------------------------------------------------
# designed rows: each penalty (and each of its rules) flips the greedy choice
# ---------------------------------------------------------------------------------------------------------------

# Every row: token 5 has logit 2.0, token 9 has 1.5, the rest far below. (rep, pres, freq, 5 in the prompt,
# times 5 was generated, expected greedy id, what the row shows)
HI, LO = 5, 9
DESIGNED = [
    (1.0, 0.0, 0.0, True, 3, HI, "all off: the plain argmax"),
    (1.5, 0.0, 0.0, True, 0, LO, "repetition over the prompt: 2 / 1.5 < 1.5"),
    (1.5, 0.0, 0.0, False, 1, LO, "repetition over the generated ids"),
    (1.2, 0.0, 0.0, True, 3, HI, "repetition once per token: 2 / 1.2 > 1.5 (not 2 / 1.2^3)"),
    (1.0, 1.0, 0.0, False, 1, LO, "presence: 2 - 1 < 1.5"),
    (1.0, 0.3, 0.0, False, 5, HI, "presence once: 2 - 0.3 > 1.5 (not 2 - 5 * 0.3)"),
    (1.0, 1.0, 0.0, True, 0, HI, "presence ignores the prompt"),
    (1.0, 0.0, 0.2, False, 3, LO, "frequency counts: 2 - 3 * 0.2 < 1.5"),
    (1.0, 0.0, 0.2, False, 1, HI, "frequency: 2 - 0.2 > 1.5"),
    (1.0, 0.0, 1.0, True, 0, HI, "frequency ignores the prompt"),
]
# Rows with their own logits: (logits of 5 and 9, rep, pres, freq, 5 in prompt, count of 5, expected, what)
DESIGNED_OWN = [
    ((-1.0, -1.2), 1.5, 0.0, 0.0, True, 0, LO, "repetition multiplies negatives: -1.5 < -1.2"),
    ((2.0, 0.6), 2.0, 0.0, 0.5, False, 1, LO, "repetition before frequency: 2 / 2 - 0.5 < 0.6 (not (2 - .5) / 2)"),
    ((1.5, 2.0), 1.0, -1.0, 0.0, False, 1, HI, "negative presence boosts: 1.5 + 1 > 2"),
]


def _designed_batch(v: int = 64):
    rows = [((2.0, 1.5), *r) for r in DESIGNED] + DESIGNED_OWN
    b = len(rows)
    z = torch.full((b, v), -5.0) + torch.linspace(0, 0.1, v)  # distinct low logits
    mask = torch.zeros(b, v, dtype=torch.bool)
    counts = torch.zeros(b, v, dtype=torch.int32)
    mask[:, 30] = True  # an unrelated prompt token and an unrelated generated one, in every row
    counts[:, 31] = 2
    rep, pres, freq, expected, what = [], [], [], [], []
    for r, ((z_hi, z_lo), p_rep, p_pres, p_freq, in_prompt, n, exp, why) in enumerate(rows):
        z[r, HI], z[r, LO] = z_hi, z_lo
        mask[r, HI] = in_prompt
        counts[r, HI] = n
        rep.append(p_rep), pres.append(p_pres), freq.append(p_freq), expected.append(exp), what.append(why)
    pen = dict(repetition_penalty=torch.tensor(rep), presence_penalty=torch.tensor(pres))
    pen.update(frequency_penalty=torch.tensor(freq))
    return z, mask, counts, pen, expected, what


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_each_penalty_and_each_of_its_rules_decides_the_greedy_token(backend):
    z, mask, counts, pen, expected, what = _designed_batch()
    ids, lp, bad = combine_and_sample(
        z, None, prompt_mask=mask, output_counts=counts, return_logprobs=True, backend=backend, **pen
    )
    got = ids.tolist()
    wrong = [f"{w}: got {g}, expected {e}" for g, e, w in zip(got, expected, what, strict=True) if g != e]
    assert not wrong, wrong
    assert not bad.any()
    assert ids.tolist() != z.argmax(-1).tolist()  # test design: without penalties some rows would differ
    # the logprobs are those of the penalized distribution (written from the definition, in float64)
    prompt = [torch.nonzero(mask[r]).flatten() for r in range(z.shape[0])]
    gen = [torch.repeat_interleave(torch.arange(z.shape[1]), counts[r].long()) for r in range(z.shape[0])]
    exact = torch.stack(
        [
            penalized64(z[r : r + 1], prompt[r][None], gen[r][None], *(float(p[r]) for p in pen.values()))[0]
            for r in range(z.shape[0])
        ]
    )
    ref = _log_softmax64(exact).gather(1, ids[:, None])[:, 0]
    torch.testing.assert_close(lp.double(), ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# the kernel against the reference
# ---------------------------------------------------------------------------------------------------------------


def _both(base, value, **kw):
    """(triton result, torch result) of the same call."""
    return tuple(combine_and_sample(base, value, backend=be, **kw) for be in ("triton", "torch"))


def _map_150_to_111(seed: int) -> VocabMap:
    g = torch.Generator().manual_seed(seed)
    w = torch.zeros(150, 111)
    for u in range(150):
        targets = torch.randint(0, 111, (torch.randint(1, 3, (1,), generator=g).item(),), generator=g)
        w[u, targets] = torch.rand(len(targets), generator=g)
    return VocabMap.from_dense(w)


@pytest.mark.parametrize("mapped", [False, True], ids=["same-vocab", "vocab-map"])
def test_kernel_greedy_equals_reference_with_per_row_penalties(mapped):
    """Per-row penalties (row 0 all off, rows 1-2 one penalty each, the rest mixed); V_out = 111, base through a
    150 -> 111 map or the same vocabulary; greedy ids exact, logprobs at fp32 tolerance."""
    b, v_out, alpha = 6, 111, 0.5
    g = torch.Generator().manual_seed(7)
    vmap = _map_150_to_111(8) if mapped else None
    base = torch.randn(b, 150 if mapped else v_out, generator=g) * 3
    value = torch.randn(b, v_out, generator=g)
    prompt, gen = _history(b, v_out, seed=9)
    mask, counts = _state(prompt, gen, v_out)
    pen = dict(
        repetition_penalty=torch.tensor([1.0, 1.8, 1.0, 1.3, 0.7, 2.0]),
        presence_penalty=torch.tensor([0.0, 0.0, 1.2, 0.5, -0.5, 2.0]),
        frequency_penalty=torch.tensor([0.0, 0.0, 0.0, 0.4, 1.0, -0.5]),
    )
    # test design: token T = gen[r, 0] (in the prompt and generated) is each row's argmax by 0.25 before the
    # penalties, so rows 1, 2, 3 and 5 (whose penalties lower T by more) must pick another token
    zb = vmap.apply(base) if mapped else base
    z0 = zb + alpha * value  # [B, V_out]
    t = gen[:, 0]
    z0[torch.arange(b), t] = float("-inf")
    value[torch.arange(b), t] += (z0.amax(-1) + 0.25 - (zb + alpha * value)[torch.arange(b), t]) / alpha
    kw = dict(vocab_map=vmap, alpha=alpha, prompt_mask=mask, output_counts=counts, return_logprobs=True)
    ids_off, lp_off, _ = combine_and_sample(base, value, backend="triton", **kw)
    assert torch.equal(ids_off, t)
    (ids_t, lp_t, bad_t), (ids_r, lp_r, bad_r) = _both(base, value, **kw, **pen)
    assert torch.equal(ids_t, ids_r)
    torch.testing.assert_close(lp_t, lp_r)  # fp32 defaults: rtol 1.3e-6, atol 1e-5
    assert not bad_t.any() and not bad_r.any()
    # row 0 is off: bit-identical to no penalties; the penalties moved the others' argmax
    assert ids_t[0] == ids_off[0] and torch.equal(lp_t[0], lp_off[0])
    assert (ids_t[[1, 2, 3, 5]] != t[[1, 2, 3, 5]]).all(), (ids_t, t)


def test_kernel_with_penalties_all_off_is_bit_identical_to_no_penalties():
    """HAS_PENALTY with every row at 1 / 0 / 0 changes nothing (the penalty arithmetic is exact there)."""
    b, v = 4, 300
    g = torch.Generator().manual_seed(10)
    base, value = torch.randn(b, v, generator=g), torch.randn(b, v, generator=g)
    mask, counts = _state(*_history(b, v, seed=11), v)
    off = dict(repetition_penalty=torch.ones(b), presence_penalty=torch.zeros(b), frequency_penalty=torch.zeros(b))
    kw = dict(return_logprobs=True, do_sample=True, temperature=0.9, top_k=50, seed=3, backend="triton")
    a = combine_and_sample(base, value, prompt_mask=mask, output_counts=counts, **off, **kw)
    c = combine_and_sample(base, value, **kw)
    assert all(torch.equal(x, y) for x, y in zip(a, c, strict=True))
    # scalar penalties that are off: the tensors may be given (and are ignored)
    d = combine_and_sample(base, value, prompt_mask=mask, output_counts=counts, **kw)
    assert all(torch.equal(x, y) for x, y in zip(d, c, strict=True))


def test_kernel_sampling_with_penalties_and_warpers_against_the_reference():
    """Per-row temperatures (two rows greedy, temperature 0) with top_k / top_p / min_p and per-row penalties
    (row 0 off), V = 300 over one block and a bit: greedy rows exact; sampled ids always inside the support of the
    oracle's warped distribution of the penalized logits; logprobs are the penalized (unwarped) ones."""
    b, v = 6, 300
    g = torch.Generator().manual_seed(12)
    base, value = torch.randn(b, v, generator=g) * 2, torch.randn(b, v, generator=g)
    prompt, gen = _history(b, v, seed=13)
    mask, counts = _state(prompt, gen, v)
    value[:, :8] += 3.0  # the generated tokens sit at the top: the penalties reshape the kept set
    pen = dict(
        repetition_penalty=torch.tensor([1.0, 1.5, 1.0, 2.0, 1.2, 0.8]),
        presence_penalty=torch.tensor([0.0, 0.0, 1.5, 0.5, 0.0, 0.3]),
        frequency_penalty=torch.tensor([0.0, 0.3, 0.0, 0.0, 0.8, 0.2]),
    )
    temp = torch.tensor([0.8, 0.0, 1.0, 0.7, 0.0, 1.2])
    warp = dict(top_k=torch.tensor([20, 0, 10, 5, 0, 40]), top_p=0.9, min_p=0.02)
    kw = dict(alpha=1.0, prompt_mask=mask, output_counts=counts, return_logprobs=True, do_sample=True, **warp)
    (ids_r, lp_r, _) = combine_and_sample(base, value, backend="torch", temperature=temp, **kw, **pen)
    z64 = penalized64(base.double() + value.double(), prompt, gen, *pen.values())
    for seed in range(3):
        ids_t, lp_t, bad_t = combine_and_sample(base, value, backend="triton", seed=seed, temperature=temp, **kw, **pen)
        greedy = temp == 0
        assert torch.equal(ids_t[greedy], ids_r[greedy])
        for r in range(b):
            if not greedy[r]:
                kr = {k: (float(x[r]) if isinstance(x, torch.Tensor) else x) for k, x in warp.items()}
                p, margin = warped_probs64(z64[r], float(temp[r]), int(kr["top_k"]), kr["top_p"], kr["min_p"])
                assert margin > 1e-4, f"test design: row {r} has a cut within {margin:.2g} of its threshold"
                assert p[ids_t[r]] > 0, f"row {r} drew {int(ids_t[r])}, outside the warped penalized support"
        torch.testing.assert_close(lp_t.double(), _log_softmax64(z64)[torch.arange(b), ids_t], rtol=1e-5, atol=1e-5)
        assert not bad_t.any()


def test_kernel_samples_the_penalized_distribution():
    """4096 draws of one row (temperature 0.8, top_k 12) with all three penalties: the frequencies match the
    oracle's warped distribution of the penalized logits (written from the definition), and each penalty moves it
    beyond what the check allows (a kernel ignoring any one of them would fail)."""
    v, n = 111, 4096
    z1 = torch.randn(1, v, generator=torch.Generator().manual_seed(14)) * 0.5  # a low background ...
    z1[0, :6] = torch.tensor([3.0, 2.8, 2.6, -0.5, 2.4, 2.2])  # ... under a head the history penalizes
    prompt = torch.tensor([[0, 3, 50, 60]])
    gen = torch.tensor([[1, 1, 1, 2, 4, 3]])
    mask, counts = _state(prompt, gen, v)
    pen = dict(repetition_penalty=1.4, presence_penalty=0.6, frequency_penalty=0.4)
    setting = dict(temperature=0.8, top_k=12)
    exact, margin = warped_probs64(penalized64(z1, prompt, gen, *pen.values())[0], **setting)
    assert margin == math.inf  # no top_p / min_p cut: nothing near a threshold
    for name, off in (("repetition_penalty", 1.0), ("presence_penalty", 0.0), ("frequency_penalty", 0.0)):
        wrong = warped_probs64(penalized64(z1, prompt, gen, **_kw64({**pen, name: off}))[0], **setting)[0]
        assert_distinguishes(exact, wrong, n, f"a sampler without {name}")
    assert distinguishes(exact, warped_probs64(z1[0], **setting)[0], n)  # and without any penalty
    ids, _, bad = combine_and_sample(
        z1.expand(n, -1).contiguous(),
        None,
        do_sample=True,
        seed=21,
        backend="triton",
        prompt_mask=mask.expand(n, -1).contiguous(),
        output_counts=counts.expand(n, -1).contiguous(),
        **pen,
        **setting,
    )
    assert not bad.any()
    assert_matches_distribution(torch.bincount(ids, minlength=v), exact, "penalized, T=0.8, top_k=12")


def _kw64(pen: dict) -> dict:
    return dict(rep=pen["repetition_penalty"], pres=pen["presence_penalty"], freq=pen["frequency_penalty"])


def test_nonfinite_flag_is_about_the_combined_logits():
    """A NaN / inf in the combined logits is flagged with penalties on, as without them."""
    z = torch.randn(3, 64)
    z[1, 7] = float("nan")
    mask, counts = _state(*_history(3, 64, seed=15), 64)
    for backend in ("triton", "torch"):
        _, _, bad = combine_and_sample(
            z, None, repetition_penalty=1.3, prompt_mask=mask, output_counts=counts, backend=backend
        )
        assert bad.tolist() == [False, True, False], backend


def test_the_registered_op_with_penalties_agrees_with_its_fake():
    from ivl_fast.kernels.combine_and_sample import INPUTS
    from ivl_fast.ops.combine_and_sample import _triton_op
    from ivl_fast.ops.row_sampling import RowSampling

    b, v = 3, 64
    g = torch.Generator().manual_seed(0)
    base = torch.randn(b, v, generator=g)
    mask, counts = _state(*_history(b, v, seed=16), v)
    rows = RowSampling.checked(
        b, v, base.device, repetition_penalty=torch.full((b,), 1.3), prompt_mask=mask, output_counts=counts
    )
    x = dict(rows.kernel_inputs(b, base.device), base=base)
    assert x["prompt_mask"] is mask and "temperature" not in x  # greedy: penalties on, no draw
    args = ([x.get(n) for n in INPUTS], v, 1.0, None)
    torch.library.opcheck(_triton_op, args, test_utils=("test_schema", "test_faketensor"))


# ---------------------------------------------------------------------------------------------------------------
# the parameters and their refusals
# ---------------------------------------------------------------------------------------------------------------


def test_sampling_params_carry_the_penalties():
    p = SamplingParams()
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.0, 0.0, 0.0) and not p.penalties_on
    assert SamplingParams(repetition_penalty=1.1).penalties_on
    assert SamplingParams(presence_penalty=-0.5).penalties_on and SamplingParams(frequency_penalty=2).penalties_on
    assert SamplingParams(repetition_penalty=torch.ones(2)).penalties_on  # a tensor counts as on
    t = SamplingParams.trusted(False, 1.0, 0, 1.0, 0.0, presence_penalty=0.5)
    assert t.presence_penalty == 0.5 and t.penalties_on and t.greedy
    assert not SamplingParams.trusted(False, 1.0, 0, 1.0, 0.0).penalties_on
    validate_sampling(1.0, 0, 1.0, 0.0, repetition_penalty=1e-3, presence_penalty=-2, frequency_penalty=2.0)


REP = "repetition_penalty must be a finite number > 0 that float32 holds (1 disables it), got "
PRES = "presence_penalty must be in [-2, 2] (0 disables it), got "
FREQ = "frequency_penalty must be in [-2, 2] (0 disables it), got "
BAD_VALUES = [
    (dict(repetition_penalty=0), REP + "0"),
    (dict(repetition_penalty=-1.2), REP + "-1.2"),
    (dict(repetition_penalty=float("nan")), REP + "nan"),
    (dict(repetition_penalty=float("inf")), REP + "inf"),
    (dict(repetition_penalty=1e308), REP + "1e+308"),  # finite in float64, inf in the float32 it lives in
    (dict(repetition_penalty=1e-50), REP + "1e-50"),  # 0 in float32
    (dict(repetition_penalty=torch.tensor([1.0, 0.0, 1.0, 1.0])), REP + "tensor([1., 0., 1., 1.])"),
    (dict(presence_penalty=3), PRES + "3"),
    (dict(presence_penalty=-2.5), PRES + "-2.5"),
    (dict(presence_penalty=float("nan")), PRES + "nan"),
    (dict(frequency_penalty=2.01), FREQ + "2.01"),
    (dict(frequency_penalty=float("-inf")), FREQ + "-inf"),
    (dict(frequency_penalty=True), FREQ + "True"),
]


@pytest.mark.parametrize("kwargs, message", BAD_VALUES, ids=[m.split()[0] + "=" + m.split()[-1] for _, m in BAD_VALUES])
def test_invalid_penalty_values_are_refused_naming_the_argument(kwargs, message):
    mask, counts = torch.zeros(4, 64, dtype=torch.bool), torch.zeros(4, 64, dtype=torch.int32)
    calls = [
        lambda: validate_sampling(1.0, 0, 1.0, 0.0, **kwargs),
        lambda: SamplingParams(**kwargs),
        lambda: combine_and_sample(torch.zeros(4, 64), None, prompt_mask=mask, output_counts=counts, **kwargs),
        lambda: combine_and_sample(
            torch.zeros(4, 64), None, prompt_mask=mask, output_counts=counts, backend="triton", **kwargs
        ),
    ]
    for call in calls:
        with pytest.raises(ValueError) as err:
            call()
        assert str(err.value) == message


MISSING = "{} ([B=4, V=64] torch.{}) is required when repetition_penalty, presence_penalty or frequency_penalty is on, "
MISSING += "got None"
BAD_TENSORS = [
    (dict(repetition_penalty=1.2, output_counts=None), MISSING.format("output_counts", "int32")),
    (dict(presence_penalty=0.5, prompt_mask=None), MISSING.format("prompt_mask", "bool")),
    (dict(frequency_penalty=torch.zeros(4), prompt_mask=None), MISSING.format("prompt_mask", "bool")),
    (
        dict(repetition_penalty=1.2, prompt_mask=torch.zeros(4, 63, dtype=torch.bool)),
        "prompt_mask must be [B=4, V=64] (the output vocabulary), got shape (4, 63)",
    ),
    (
        dict(repetition_penalty=1.2, output_counts=torch.zeros(64, dtype=torch.int32)),
        "output_counts must be [B=4, V=64] (the output vocabulary), got shape (64,)",
    ),
    (
        dict(repetition_penalty=1.2, output_counts=torch.zeros(4, 64, dtype=torch.int64)),
        "output_counts must be torch.int32, got torch.int64",
    ),
    (
        dict(repetition_penalty=1.2, prompt_mask=torch.zeros(4, 64, dtype=torch.uint8)),
        "prompt_mask must be torch.bool, got torch.uint8",
    ),
    (
        dict(repetition_penalty=1.2, prompt_mask=torch.zeros(4, 64, dtype=torch.bool, device="meta")),
        "prompt_mask must be on cpu (the logits' device), got meta",
    ),
    (
        dict(repetition_penalty=torch.full((3,), 1.2)),
        "repetition_penalty must be a scalar or a [B=4] tensor, got shape (3,)",
    ),
    (
        dict(frequency_penalty=torch.zeros(4, 1)),
        "frequency_penalty must be a scalar or a [B=4] tensor, got shape (4, 1)",
    ),
]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("kwargs, message", BAD_TENSORS, ids=[m[:40] for _, m in BAD_TENSORS])
def test_missing_or_wrong_penalty_tensors_are_refused_naming_the_argument(kwargs, message, backend):
    """Refused on either backend, by name (these checks read only metadata: no sync)."""
    args = dict(prompt_mask=torch.zeros(4, 64, dtype=torch.bool), output_counts=torch.zeros(4, 64, dtype=torch.int32))
    args.update(kwargs)
    with pytest.raises(ValueError) as err:
        combine_and_sample(torch.zeros(4, 64), None, backend=backend, **args)
    assert str(err.value) == message


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_a_trusted_sampling_view_with_a_penalty_and_no_state_is_refused(backend):
    """sample_rows trusts its RowSampling (the decode buffers build it), but a penalty on without the prompt mask
    and counts it needs is still refused by name rather than read as no penalty."""
    from ivl_fast.ops.combine_and_sample import sample_rows
    from ivl_fast.ops.row_sampling import RowSampling
    from ivl_fast.sampling import SamplingParams

    rows = RowSampling(SamplingParams.trusted(False, 1.0, 0, 1.0, 0.0, repetition_penalty=1.3))
    with pytest.raises(ValueError, match="prompt_mask and output_counts are required when repetition_penalty"):
        sample_rows(torch.zeros(4, 64), None, rows, backend=backend)


def test_the_penalty_tensors_follow_the_output_vocabulary_through_a_map():
    """With a vocab map, prompt_mask / output_counts are over the value (output) vocabulary, not the base one."""
    vmap = _map_150_to_111(17)
    base, value = torch.randn(2, 150), torch.randn(2, 111)
    kw = dict(vocab_map=vmap, repetition_penalty=1.2, backend="triton")
    with pytest.raises(ValueError) as err:
        combine_and_sample(
            base,
            value,
            prompt_mask=torch.zeros(2, 150, dtype=torch.bool),
            output_counts=torch.zeros(2, 150, dtype=torch.int32),
            **kw,
        )
    assert str(err.value) == "prompt_mask must be [B=2, V=111] (the output vocabulary), got shape (2, 150)"
    ids, _, _ = combine_and_sample(
        base,
        value,
        prompt_mask=torch.zeros(2, 111, dtype=torch.bool),
        output_counts=torch.zeros(2, 111, dtype=torch.int32),
        **kw,
    )
    assert ids.shape == (2,)
