"""ivl_fast.sampling's argument checks and small helpers: validation (whole messages), SamplingParams' defaults,
combine_logits, token_logprobs against float64, nonfinite_rows. The warpers and the sampler themselves are
tests/test_sampling.py."""

from __future__ import annotations

import pytest
import torch
from sampling_oracle import log_softmax64, random_logits

from ivl_fast.sampling import SamplingParams, combine_logits, nonfinite_rows, token_logprobs, validate_sampling

# ----------------------------------------------------------------------------------------------------------
# 6. validation
# ----------------------------------------------------------------------------------------------------------

GOOD = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)

BAD_VALUES = [
    ("temperature", -0.1),
    ("temperature", float("nan")),
    ("temperature", float("inf")),
    ("temperature", float("-inf")),
    ("top_k", -1),
    ("top_k", 2.5),
    ("top_k", float("nan")),
    ("top_p", 0.0),
    ("top_p", 1.5),
    ("top_p", -0.1),
    ("top_p", float("nan")),
    ("min_p", -0.1),
    ("min_p", 1.5),
    ("min_p", float("nan")),
    # one bad entry in a per-row tensor is enough
    ("temperature", torch.tensor([1.0, -1.0, 0.5])),
    ("temperature", torch.tensor([1.0, float("nan")])),
    ("top_k", torch.tensor([3, -1])),
    ("top_k", torch.tensor([3.0, 2.5])),
    ("top_p", torch.tensor([0.9, 0.0])),
    ("top_p", torch.tensor([1.0, 1.5])),
    ("min_p", torch.tensor([0.0, -0.1])),
    ("min_p", torch.tensor([0.5, 1.5])),
    ("temperature", 1e39),  # finite in float64, inf in the float32 it lives in
    ("temperature", 1e-50),  # 0 in float32: a division by zero
    # a bool is an int to Python, never a sampling parameter
    ("temperature", True),
    ("top_k", False),
]


@pytest.mark.parametrize("name,value", BAD_VALUES, ids=[f"{n}={v!r}" for n, v in BAD_VALUES])
def test_invalid_values_raise_naming_the_argument(name, value):
    # the whole message: the argument, the documented rule for it, and the value given
    rule = {
        "temperature": "a finite number >= 0 that float32 holds",
        "top_k": "an integer >= 0 (0 disables it)",
        "top_p": "in (0, 1] (1 disables it)",
        "min_p": "in [0, 1] (0 disables it)",
    }[name]
    kwargs = {**GOOD, name: value}
    for call in (lambda: validate_sampling(**kwargs), lambda: SamplingParams(do_sample=True, **kwargs)):
        with pytest.raises(ValueError) as err:
            call()
        assert str(err.value) == f"{name} must be {rule}, got {value!r}"


GOOD_VALUES = [
    ("temperature", 0.0),
    ("temperature", 0),
    ("top_p", 1.0),
    ("top_p", 1e-9),
    ("min_p", 0.0),
    ("min_p", 1.0),
    ("top_k", 0),
    ("top_k", 10**6),
    ("temperature", torch.tensor([0.0, 1.0, 2.5])),
    ("top_k", torch.tensor([0, 1, 50])),
    ("top_p", torch.tensor([1.0, 0.5])),
    ("min_p", torch.tensor([0.0, 1.0])),
]


@pytest.mark.parametrize("name,value", GOOD_VALUES, ids=[f"{n}={v!r}" for n, v in GOOD_VALUES])
def test_boundary_values_are_accepted(name, value):
    kwargs = {**GOOD, name: value}
    validate_sampling(**kwargs)
    SamplingParams(do_sample=True, **kwargs)


def test_first_invalid_argument_is_named():
    with pytest.raises(ValueError, match="temperature"):
        validate_sampling(-1.0, -1, 0.0, 2.0)
    with pytest.raises(ValueError, match="top_p"):
        validate_sampling(1.0, 3, 0.0, 2.0)


# ----------------------------------------------------------------------------------------------------------
# 7. combine_logits
# ----------------------------------------------------------------------------------------------------------


def test_combine_logits_is_fp32_base_plus_alpha_value():
    base, value = random_logits(3, 111, seed=1), random_logits(3, 111, seed=2)
    out = combine_logits(base, value, alpha=0.75)
    assert out.dtype == torch.float32
    assert torch.equal(out, base + 0.75 * value)
    assert torch.equal(combine_logits(base, value), base + value)  # alpha defaults to 1


def test_combine_logits_upcasts_bf16_before_adding():
    # 256 + 0.5 * 1 = 256.5 is exact in fp32 but rounds back to 256 in bf16 (8 significant bits).
    base = torch.full((2, 5), 256.0, dtype=torch.bfloat16)
    value = torch.ones(2, 5, dtype=torch.bfloat16)
    out = combine_logits(base, value, alpha=0.5)
    assert out.dtype == torch.float32
    assert torch.equal(out, torch.full((2, 5), 256.5))
    # general bf16 inputs: same as adding the fp32 upcasts
    b16, v16 = random_logits(2, 111, seed=3).bfloat16(), random_logits(2, 111, seed=4).bfloat16()
    assert torch.equal(combine_logits(b16, v16, alpha=1.3), b16.float() + 1.3 * v16.float())


def test_combine_logits_with_one_side_missing():
    base = random_logits(2, 111, seed=5).bfloat16()
    for out in (combine_logits(base, None, alpha=3.0), combine_logits(None, base, alpha=3.0)):
        assert out.dtype == torch.float32
        assert torch.equal(out, base.float())  # alone, a side is used as is (alpha not applied)
    with pytest.raises(ValueError):
        combine_logits(None, None)


def test_combine_logits_shape_mismatch():
    for shape in ((2, 112), (3, 111)):
        with pytest.raises(ValueError) as err:
            combine_logits(torch.zeros(2, 111), torch.zeros(*shape))
        assert str(err.value) == f"base logits (2, 111) and value logits {shape} differ"


def test_sampling_params_default_to_greedy_at_temperature_1_with_every_filter_off():
    p = SamplingParams()
    assert (p.do_sample, p.temperature, p.top_k, p.top_p, p.min_p) == (False, 1.0, 0, 1.0, 0.0)
    assert p.greedy and not (p.top_k_on or p.top_p_on or p.min_p_on)
    assert p == SamplingParams.trusted(False, 1.0, 0, 1.0, 0.0)


# ----------------------------------------------------------------------------------------------------------
# 8. token_logprobs and nonfinite_rows
# ----------------------------------------------------------------------------------------------------------


def test_token_logprobs_is_log_softmax_gathered():
    logits = random_logits(5, 1271, seed=9)
    ids = torch.tensor([0, 1270, 17, 600, 3])
    lp = token_logprobs(logits, ids)
    assert lp.shape == (5,)
    expected = torch.stack([torch.log_softmax(logits[i], -1)[ids[i]] for i in range(5)])
    assert torch.equal(lp, expected)
    # independent check in float64
    exact = torch.log_softmax(logits.double(), -1)[torch.arange(5), ids]
    torch.testing.assert_close(lp.double(), exact, rtol=1e-6, atol=1e-5)
    assert (lp <= 0).all()


def test_token_logprobs_stay_exact_for_very_unlikely_tokens():
    # log p of a token ~200 nats below the top one: log(softmax) underflows to -inf in fp32 (exp(-200) < 1e-38),
    # a log-sum-exp formulation gives -200.x. Row 1 also holds a huge logit (exp overflows without a max shift).
    # Compared with the float64 definition under DESIGN's rule (2x torch's own fp32 log_softmax error).
    logits = random_logits(3, 1271, seed=10)
    logits[:, 7] = logits.amax(-1) - 200.0
    logits[1, 9] = 1e4
    ids = torch.tensor([7, 7, 7])
    lp = token_logprobs(logits, ids)
    exact = log_softmax64(logits)
    torch_err = (logits.log_softmax(-1).double() - exact).abs().max().item()
    assert torch.isfinite(lp).all()
    assert (lp.double() - exact[torch.arange(3), ids]).abs().max().item() <= max(2 * torch_err, 1e-7)
    assert (lp < -199).all()


def test_nonfinite_rows_flags_exactly_the_bad_rows():
    logits = random_logits(7, 111, seed=12)
    logits[1, 5] = float("nan")
    logits[3, 0] = float("inf")
    logits[4, 110] = float("-inf")
    logits[6, 50:60] = float("nan")
    logits[2, 7] = torch.finfo(torch.float32).max  # huge but finite
    logits[5, 8] = -torch.finfo(torch.float32).max
    flags = nonfinite_rows(logits)
    assert flags.dtype == torch.bool and flags.shape == (7,)
    assert flags.tolist() == [False, True, False, True, True, False, True]
    assert not nonfinite_rows(random_logits(3, 1271, seed=13)).any()
