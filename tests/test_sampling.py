"""Tests for ivl_fast.sampling, the torch reference spec the fused kernel must match.

The spec says the warpers follow ``transformers`` exactly (temperature -> top_k -> top_p -> min_p,
min_tokens_to_keep=1), so the main oracle here is the real ``transformers`` warpers chained in that order.
Everything runs on CPU and is sized to keep the whole file fast.
"""

from __future__ import annotations

import functools
import itertools
import math

import pytest
import torch
from sampling_oracle import WARPER_OFF, distinguishes, random_logits, tv_bound, warped_probs64
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from ivl_fast.sampling import (
    SamplingParams,
    sample_ref,
    warp_logits,
)


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Run this module's many tiny tensor ops on one intra-op thread.

    On a small, busy CPU the OpenMP pool makes each tiny op (e.g. softmax on [6, 111]) wait milliseconds for
    its workers; one thread keeps the file fast and its timing stable. The previous setting is restored.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------


def hf_warp(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """The transformers oracle: the warpers GenerationMixin._get_logits_processor builds for do_sample=True.

    It appends TemperatureLogitsWarper only when temperature != 1, TopK only when top_k != 0, TopP only when
    top_p < 1, and MinP whenever min_p is set (min_p=0 removes nothing), all with min_tokens_to_keep=1.
    """
    procs = LogitsProcessorList()
    if temperature != 1.0:
        procs.append(TemperatureLogitsWarper(float(temperature)))
    if top_k != 0:
        procs.append(TopKLogitsWarper(int(top_k), min_tokens_to_keep=1))
    if top_p < 1.0:
        procs.append(TopPLogitsWarper(float(top_p), min_tokens_to_keep=1))
    procs.append(MinPLogitsWarper(float(min_p), min_tokens_to_keep=1))
    input_ids = torch.zeros(logits.shape[0], 1, dtype=torch.long)  # unused by these warpers
    # transformers' TopPLogitsWarper calls torch.sort, whose order of tied logits is implementation-defined
    # (CPU: unstable; CUDA: radix, stable). Our spec fixes it to the stable order, so the oracle uses that.
    orig = torch.sort
    torch.sort = functools.partial(orig, stable=True)
    try:
        return procs(input_ids, logits.clone())
    finally:
        torch.sort = orig


def assert_same_warp(ours: torch.Tensor, ref: torch.Tensor, msg: str = "") -> None:
    """Same -inf mask and bit-identical finite values (tolerance 0)."""
    ours_mask, ref_mask = torch.isneginf(ours), torch.isneginf(ref)
    diff = (ours_mask != ref_mask).nonzero().tolist()
    assert not diff, f"{msg}: -inf masks differ at (row, token) {diff[:10]}"
    assert torch.equal(ours, ref), f"{msg}: finite values differ (max abs diff {(ours - ref).abs().nan_to_num().max()})"


def tied_logits(b: int, v: int, seed: int) -> torch.Tensor:
    """Integer logits from a small range: many exact ties everywhere, including at the k-th largest value."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-4, 4, (b, v), generator=g).float()


# ----------------------------------------------------------------------------------------------------------
# 1. warp_logits == chained transformers warpers
# ----------------------------------------------------------------------------------------------------------

TEMPERATURES = [0.5, 1.0, 1.7]
TOP_PS = [0.3, 0.9, 1.0]
MIN_PS = [0.0, 0.05, 0.5]


def top_k_values(v: int) -> list[int]:
    return [0, 1, 5, v, v + 10]  # 0 = off; V and V+10 keep everything (transformers clamps k to V)


@pytest.mark.parametrize("make_logits", [random_logits, tied_logits], ids=["random", "ties"])
@pytest.mark.parametrize("v", [111, 1271])
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_warp_matches_transformers(make_logits, v, temperature):
    # Full grid over top_k x top_p x min_p for each (logits kind, V, temperature): 45 settings per test.
    logits = make_logits(6, v, seed=v + int(temperature * 10))
    before = logits.clone()
    for top_k, top_p, min_p in itertools.product(top_k_values(v), TOP_PS, MIN_PS):
        ours = warp_logits(logits, temperature, top_k, top_p, min_p)
        ref = hf_warp(logits, temperature, top_k, top_p, min_p)
        assert_same_warp(ours, ref, f"V={v} t={temperature} top_k={top_k} top_p={top_p} min_p={min_p}")
        assert not torch.isneginf(ours).all(-1).any(), "every row must keep at least one token"
        if make_logits is tied_logits and (top_k, top_p, min_p) == (5, 1.0, 0.0):
            # the 5th largest value is shared by many tokens here: all of them are kept, so more than 5
            assert ((~torch.isneginf(ours)).sum(-1) > 5).all()
    assert torch.equal(logits, before), "warp_logits must not modify its input"


def test_top_k_keeps_every_tie_at_kth_value():
    # k=2: the 2nd largest value (4) is shared by three tokens; transformers keeps all of them (>= k-th value).
    logits = torch.tensor([[1.0, 4.0, 5.0, 4.0, 3.0, 4.0, 0.0]])
    ours = warp_logits(logits, top_k=2)
    kept = (~torch.isneginf(ours[0])).nonzero().flatten().tolist()
    assert kept == [1, 2, 3, 5]
    assert_same_warp(ours, hf_warp(logits, 1.0, 2, 1.0, 0.0), "top_k=2 ties")
    # All tokens tied: top_k=1 keeps the whole row.
    flat = torch.zeros(2, 9)
    assert not torch.isneginf(warp_logits(flat, top_k=1)).any()


def test_min_p_one_keeps_only_the_tied_maxima():
    # min_p=1 (allowed boundary) removes everything strictly below the top probability; tied maxima survive.
    logits = torch.tensor([[2.0, 7.0, 7.0, 6.999, -1.0]])
    ours = warp_logits(logits, min_p=1.0)
    assert (~torch.isneginf(ours[0])).nonzero().flatten().tolist() == [1, 2]
    assert_same_warp(ours, hf_warp(logits, 1.0, 0, 1.0, 1.0), "min_p=1")


def test_top_p_always_keeps_the_top_token():
    # A very small top_p on a peaked row still keeps exactly the most likely token (min_tokens_to_keep=1).
    logits = torch.tensor([[0.0, 10.0, 1.0, 2.0]])
    ours = warp_logits(logits, top_p=1e-6)
    assert (~torch.isneginf(ours[0])).nonzero().flatten().tolist() == [1]
    assert_same_warp(ours, hf_warp(logits, 1.0, 0, 1e-6, 0.0), "top_p=1e-6")


# Regression: transformers compares with (1 - top_p) computed in double, then rounded to float32; computing
# 1 - float32(top_p) instead gives 0.10000002384 for top_p=0.9 instead of 0.10000000149 and removes a token
# whose cumulative probability lands between the two.
def test_top_p_threshold_rounding_matches_transformers():
    # Two tokens: the smaller one's probability is float32 0.10000001639..., just above transformers' threshold.
    logits = torch.tensor([[-2.1972243785858154, 0.0]])
    cum_small = logits.sort(-1).values.softmax(-1).cumsum(-1)[0, 0].item()
    assert 0.1000000015 < cum_small < 0.1000000239  # the input really sits between the two thresholds
    ref = hf_warp(logits, 1.0, 0, 0.9, 0.0)
    assert not torch.isneginf(ref).any()  # transformers keeps both tokens
    assert_same_warp(warp_logits(logits, top_p=0.9), ref, "top_p=0.9 threshold rounding")


# ----------------------------------------------------------------------------------------------------------
# 2. per-row [B] tensor parameters == scalar calls row by row
# ----------------------------------------------------------------------------------------------------------

# One row per line: (temperature, top_k, top_p, min_p); each parameter is disabled on some rows.
ROW_PARAMS = [
    (1.0, 0, 1.0, 0.0),  # everything off
    (0.5, 5, 1.0, 0.0),
    (1.7, 0, 0.9, 0.0),
    (1.0, 0, 1.0, 0.05),
    (1.3, 1, 0.3, 0.5),
    (0.7, 50, 0.9, 0.05),
    (1.0, 2000, 1.0, 0.5),  # top_k > V: keeps everything
    (2.0, 20, 0.3, 0.0),
]


@pytest.mark.parametrize("v", [111, 1271])
@pytest.mark.parametrize("make_logits", [random_logits, tied_logits], ids=["random", "ties"])
def test_per_row_tensor_params_match_scalar_calls(v, make_logits):
    logits = make_logits(len(ROW_PARAMS), v, seed=7)
    t, k, p, mp = (list(col) for col in zip(*ROW_PARAMS, strict=True))
    batched = warp_logits(logits, torch.tensor(t), torch.tensor(k), torch.tensor(p), torch.tensor(mp))
    for i, (ti, ki, pi, mpi) in enumerate(ROW_PARAMS):
        row = warp_logits(logits[i : i + 1], ti, ki, pi, mpi)
        assert_same_warp(batched[i : i + 1], row, f"row {i} {ROW_PARAMS[i]}")
        # and the row also matches transformers directly
        assert_same_warp(batched[i : i + 1], hf_warp(logits[i : i + 1], ti, ki, pi, mpi), f"row {i} vs HF")


def test_per_row_tensor_params_mixed_with_scalars():
    # Only one parameter per-row, the others scalar: same as scalar calls row by row.
    logits = random_logits(4, 111, seed=3)
    top_k = torch.tensor([0, 3, 111, 7])
    batched = warp_logits(logits, 1.3, top_k, 0.9, 0.05)
    for i in range(4):
        assert_same_warp(batched[i : i + 1], warp_logits(logits[i : i + 1], 1.3, int(top_k[i]), 0.9, 0.05), f"row {i}")


def test_sample_ref_per_row_params_use_each_rows_settings():
    # The exponential race draws one [B, V] matrix per call, so with the same seed row i of a call with [B]
    # tensor params must equal row i of a call with row i's settings as scalars: an exact, RNG-free check.
    logits = random_logits(len(ROW_PARAMS), 1271, seed=21, scale=1.0)
    rows = [(0.0, 5, 0.9, 0.05)] + ROW_PARAMS[1:]  # row 0 greedy (t=0) amid sampling rows
    t, k, p, mp = (torch.tensor(col) for col in zip(*rows, strict=True))
    batched = SamplingParams(do_sample=True, temperature=t, top_k=k, top_p=p, min_p=mp)
    ids = sample_ref(logits, batched, torch.Generator().manual_seed(5))
    for i, (ti, ki, pi, mpi) in enumerate(rows):
        scalar = SamplingParams(do_sample=True, temperature=ti, top_k=ki, top_p=pi, min_p=mpi)
        assert ids[i] == sample_ref(logits, scalar, torch.Generator().manual_seed(5))[i], f"row {i} {rows[i]}"
    assert ids[0] == logits[0].argmax()


def test_zero_temperature_rows_are_left_unscaled():
    # Rows with t=0 are decoded greedily; warp_logits returns them unscaled (filters still apply).
    logits = random_logits(3, 111, seed=5)
    out = warp_logits(logits, torch.tensor([0.0, 2.0, 0.0]))
    assert torch.equal(out[0], logits[0]) and torch.equal(out[2], logits[2])
    assert torch.equal(out[1], logits[1] / 2.0)


# ----------------------------------------------------------------------------------------------------------
# 3. greedy decoding
# ----------------------------------------------------------------------------------------------------------


def tied_greedy_logits(v: int) -> tuple[torch.Tensor, list[int]]:
    """Rows with explicit ties for the maximum, and the expected lowest-index argmax of each."""
    g = torch.Generator().manual_seed(v)
    logits = torch.randn(4, v, generator=g)
    logits[0, [3, v // 2, v - 1]] = 9.0  # three-way tie -> 3
    logits[1, [v - 2, v - 1]] = 9.0  # tie at the very end -> v-2
    logits[2, v - 1] = 9.0  # unique max in the last slot -> v-1
    logits[3] = 1.25  # the whole row tied -> 0
    return logits, [3, v - 2, v - 1, 0]


@pytest.mark.parametrize("v", [111, 32000, 128256])
def test_greedy_is_lowest_index_argmax(v):
    logits, expected = tied_greedy_logits(v)
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    # do_sample=False ignores every other setting, even ones that would cut the argmax out.
    for params in [SamplingParams(), SamplingParams(do_sample=False, temperature=1.7, top_k=1, top_p=0.3, min_p=0.5)]:
        assert params.greedy
        ids = sample_ref(logits, params, gen)
        assert ids.dtype == torch.int64 and ids.shape == (4,)
        assert ids.tolist() == expected
    # temperature=0 with do_sample=True is greedy too (scalar and all-zero tensor)
    for t in [0.0, torch.zeros(4)]:
        params = SamplingParams(do_sample=True, temperature=t, top_k=5, top_p=0.9)
        assert params.greedy
        assert sample_ref(logits, params, gen).tolist() == expected
    assert torch.equal(gen.get_state(), state), "greedy decoding must not touch the generator"


@pytest.mark.parametrize("v", [111, 32000])
def test_per_row_zero_temperature_rows_are_greedy(v):
    # Flat rows: greedy rows must return 0 (lowest index), sampling rows spread over the vocabulary.
    b = 64
    logits = torch.zeros(b, v)
    temperature = torch.tensor([0.0, 1.0] * (b // 2))
    params = SamplingParams(do_sample=True, temperature=temperature)
    assert not params.greedy
    gen = torch.Generator().manual_seed(1)
    ids = sample_ref(logits, params, gen)
    assert ids[0::2].tolist() == [0] * (b // 2)
    # 32 uniform draws over >= 111 tokens: all equal to 0 with probability <= 111**-32
    assert ids[1::2].unique().numel() > 1
    # Rows with explicit ties: t=0 rows give the lowest-index argmax whatever the other settings.
    logits, expected = tied_greedy_logits(v)
    params = SamplingParams(do_sample=True, temperature=torch.tensor([0.0, 0.0, 0.0, 0.0]), top_k=3, min_p=0.5)
    assert sample_ref(logits, params, gen).tolist() == expected
    mixed = SamplingParams(do_sample=True, temperature=torch.tensor([0.0, 1.0, 0.0, 1.0]), top_k=1)
    ids = sample_ref(logits, mixed, gen)
    assert ids[0].item() == expected[0] and ids[2].item() == expected[2]
    # row 1 samples with top_k=1 among its two tied maxima; row 3 is a fully tied row, so anything goes
    assert ids[1].item() in (v - 2, v - 1)


def test_top_k_one_sampling_is_argmax_without_ties():
    logits = random_logits(16, 1271, seed=11)
    gen = torch.Generator().manual_seed(2)
    ids = sample_ref(logits, SamplingParams(do_sample=True, temperature=1.7, top_k=1), gen)
    assert torch.equal(ids, logits.argmax(-1))


# ----------------------------------------------------------------------------------------------------------
# 4. sampled frequencies follow softmax(warp_logits(...))
# ----------------------------------------------------------------------------------------------------------

TV_MAX = 0.02
CHUNK = 4096  # rows per sample_ref call
# Sample-size rule (computed, not guessed). With N draws from p, the empirical distribution p_hat has
#   E[TV] <= 1/2 * sum_i sqrt(p_i (1 - p_i) / N)                    (Jensen, token by token)
#   sd[TV] ~= 1/2 * sqrt((1 - 2/pi) * sum_i p_i (1 - p_i) / N) <= 0.3015 / sqrt(N)   (normal approximation)
# and draws_needed() picks the smallest N (a multiple of CHUNK) with E-bound + 5 sd <= TV_MAX. The rows below
# are peaked so that N stays <= 16384 (each draw costs a full [V] row). With the 5 sd margin a correct sampler
# fails this test with odds around 1e-6 (normal tail); the exact distribution is the float64 oracle of
# tests/sampling_oracle.py, written from the definition, not ivl_fast.sampling.warp_logits.
SD_COEF = 0.5 * math.sqrt(1 - 2 / math.pi)
N_SIGMA = 5


def draws_needed(p: torch.Tensor) -> int:
    half_sum = 0.5 * (p * (1 - p)).sqrt().sum().item()
    n = ((half_sum + N_SIGMA * SD_COEF) / TV_MAX) ** 2
    return math.ceil(n / CHUNK) * CHUNK


def geometric_logits(v: int, ratio: float, temperature: float, seed: int) -> torch.Tensor:
    """A peaked row (so the needed N stays small): after dividing by temperature, p_j ~ ratio**rank_j * noise,
    with the ranks randomly permuted over the vocabulary so kept tokens are scattered."""
    g = torch.Generator().manual_seed(seed)
    rank = torch.randperm(v, generator=g).double()
    noise = torch.rand(v, generator=g, dtype=torch.float64) * 0.3
    return (temperature * (rank * math.log(ratio) + noise)).float()


# (V, ratio, (temperature, top_k, top_p, min_p), the warpers that shape this row's distribution); ratio sets how
# peaked the row is. test_each_listed_warper_changes_the_sampled_distribution checks the last column: a sampler
# that skipped any listed warper would fail the frequency test. No single row can make top_p and min_p both matter
# (each keeps a prefix of the tokens by probability and only the shorter one counts), so "all four" takes two rows.
DIST_CASES = [
    (111, 0.5, (1.0, 0, 1.0, 0.0), ()),  # temperature 1, no filter
    (111, 0.75, (0.5, 5, 1.0, 0.0), ("temperature", "top_k")),  # cold + top_k
    (111, 0.6, (1.7, 0, 0.9, 0.0), ("temperature", "top_p")),  # hot + top_p
    (111, 0.6, (1.3, 0, 1.0, 0.15), ("temperature", "min_p")),  # min_p
    (111, 0.6, (1.7, 4, 0.9, 0.05), ("temperature", "top_k", "top_p")),  # all four set, top_p binds
    (111, 0.6, (1.7, 4, 0.95, 0.3), ("temperature", "min_p")),  # all four set, min_p binds
    (1271, 0.4, (0.7, 0, 1.0, 0.15), ("temperature", "min_p")),
    (1271, 0.45, (1.3, 3, 1.0, 0.0), ("temperature", "top_k")),
]
NAMES = ("temperature", "top_k", "top_p", "min_p")


def exact_distribution(case: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [V], the exact sampling distribution [V] float64 from the independent oracle) of a DIST_CASES row."""
    v, ratio, setting, _ = DIST_CASES[case]
    logits = geometric_logits(v, ratio, setting[0], seed=case)
    p, margin = warped_probs64(logits, *setting)
    # fp32 (the code under test) and float64 (the oracle) may only disagree on a cut closer than fp32 rounding
    assert margin > 1e-4, f"test design: case {case} has a cut within {margin:.2g} of its threshold"
    return logits, p


@pytest.mark.parametrize("case", range(len(DIST_CASES)), ids=[f"V{c[0]}-{c[2]}" for c in DIST_CASES])
def test_sampled_frequencies_match_warped_softmax(case):
    v, _, setting, _ = DIST_CASES[case]
    logits, p = exact_distribution(case)
    allowed = p > 0
    n = draws_needed(p)
    assert n <= 16384, f"test design: this row needs {n} draws, make it more peaked"

    params = SamplingParams(
        do_sample=True, temperature=setting[0], top_k=setting[1], top_p=setting[2], min_p=setting[3]
    )
    gen = torch.Generator().manual_seed(1000 + case)
    counts = torch.zeros(v, dtype=torch.long)
    for _ in range(n // CHUNK):
        ids = sample_ref(logits.expand(CHUNK, v), params, gen)  # one logit row repeated (stride-0 view)
        assert ids.shape == (CHUNK,) and ids.dtype == torch.int64
        counts += torch.bincount(ids, minlength=v)

    outside = counts[~allowed]
    assert outside.sum() == 0, f"drew removed tokens {(~allowed).nonzero().flatten()[outside > 0].tolist()}"
    tv = 0.5 * (counts.double() / n - p).abs().sum().item()
    assert tv <= TV_MAX, f"TV {tv:.4f} over {n} draws (support {int(allowed.sum())})"


def test_each_listed_warper_changes_the_sampled_distribution():
    # Guard for the test above: for each case, dropping any warper listed as shaping it moves the exact
    # distribution so far that n draws from the wrong one land more than TV_MAX away (odds ~1e-6), so the frequency
    # test would fail; and together the cases with all four warpers set show each of the four at work.
    shown = set()
    for case, (_, _, setting, matters) in enumerate(DIST_CASES):
        logits, p = exact_distribution(case)
        n = draws_needed(p)
        for name in matters:
            wrong = dict(zip(NAMES, setting, strict=True)) | {name: WARPER_OFF[name]}
            q, _ = warped_probs64(logits, **wrong)
            assert distinguishes(p, q, n, allowed=TV_MAX), f"case {case}: dropping {name} goes unnoticed"
        if all(v != WARPER_OFF[k] for k, v in zip(NAMES, setting, strict=True)):
            shown.update(matters)
    assert shown == set(NAMES)


def test_oracle_agrees_with_transformers_in_float64():
    # The float64 oracle above is test code too: on float64 logits it must give transformers' support and, to
    # float64 rounding, its probabilities.
    for seed, (t, k, p, mp) in enumerate([(0.7, 0, 0.9, 0.0), (1.3, 20, 0.8, 0.05), (1.0, 5, 1.0, 0.2)]):
        logits = random_logits(4, 300, seed=50 + seed).double()
        ref = hf_warp(logits, t, k, p, mp).softmax(-1)
        for r in range(4):
            ours, margin = warped_probs64(logits[r], t, k, p, mp)
            assert margin > 1e-6
            assert torch.equal(ours > 0, ref[r] > 0), (seed, r)
            assert (ours - ref[r]).abs().max().item() < 1e-12
    assert tv_bound(torch.tensor([0.5, 0.5]), 10**6) < 0.005  # the bound shrinks like 1/sqrt(n)


# ----------------------------------------------------------------------------------------------------------
# 5. reproducibility
# ----------------------------------------------------------------------------------------------------------


def test_same_seed_same_ids_different_seed_different_ids():
    logits = random_logits(256, 1271, seed=4, scale=0.5)  # flat enough that draws vary a lot
    params = SamplingParams(do_sample=True, temperature=1.3, top_k=200, top_p=0.95, min_p=0.01)
    a = sample_ref(logits, params, torch.Generator().manual_seed(123))
    b = sample_ref(logits, params, torch.Generator().manual_seed(123))
    c = sample_ref(logits, params, torch.Generator().manual_seed(124))
    assert torch.equal(a, b)
    # each row keeps >= dozens of tokens with the largest p well below 0.5: 256 rows all equal is impossible
    assert (a != c).sum() > 64
    # consecutive calls on one generator advance it
    gen = torch.Generator().manual_seed(123)
    first, second = sample_ref(logits, params, gen), sample_ref(logits, params, gen)
    assert torch.equal(first, a) and not torch.equal(first, second)
