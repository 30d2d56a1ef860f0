"""combine_and_sample: the Triton kernel (interpreter on CPU) against an independent float64 oracle.

Greedy is exact (ties included); sampling is tested by distribution against the exact warped distribution that
tests/sampling_oracle.py computes from the definition (never through ivl_fast.sampling), no token outside the
allowed set may ever be drawn, and each distribution check is shown able to fail: a sampler that skipped one
warper, or used another row's parameters, would not pass it. Log-probabilities are compared with float64 under
DESIGN's rule (at most 2x the error plain torch makes in fp32).
"""

from __future__ import annotations

import inspect
import math
import warnings

import pytest
import torch
from sampling_oracle import (
    WARPER_OFF,
    assert_distinguishes,
    assert_each_warper_matters,
    assert_matches_distribution,
    log_softmax64,
    warped_probs64,
)

from ivl_fast.ops.combine_and_sample import combine_and_sample
from ivl_fast.vocab import VocabMap

warnings.filterwarnings("ignore", category=RuntimeWarning)  # numpy log(0) inside the interpreter


def _peaked(v: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, v, generator=g) * scale


def _lp_tolerance(z64: torch.Tensor) -> float:
    """DESIGN's rule for log-probabilities: 2x the largest error plain torch makes computing log_softmax of the
    same combined logits in fp32 (z64: the combined logits in float64, from the very inputs the kernel gets)."""
    torch_err = (z64.float().log_softmax(-1).double() - log_softmax64(z64)).abs().max().item()
    return max(2 * torch_err, 1e-7)


@pytest.mark.parametrize("v", [111, 32000, 128256])
def test_greedy_exact_with_ties(v):
    g = torch.Generator().manual_seed(v)
    base = torch.randn(3, v, generator=g)
    value = torch.randn(3, v, generator=g)
    # row 0: a tie between two maxima (lowest index must win); row 2: everything tied
    base[0, v // 3] = base[0, v - 2] = 50.0
    value[0, v // 3] = value[0, v - 2] = 0.0
    base[2] = 1.0
    value[2] = 0.0
    ids, lp, bad = combine_and_sample(base, value, alpha=1.0, backend="triton", return_logprobs=True)
    z64 = base.double() + value.double()
    # greedy = the lowest index among the maxima of the combined logits (written out, not through torch.argmax)
    expected = [int((z64[r] == z64[r].max()).nonzero()[0]) for r in range(3)]
    assert ids.tolist() == expected
    assert ids[0].item() == v // 3 and ids[2].item() == 0
    ref = log_softmax64(z64).gather(1, ids[:, None])[:, 0]
    err = (lp.double() - ref).abs().max().item()
    assert err <= _lp_tolerance(z64), f"logprob error {err:.2e} vs float64"
    assert abs(lp[2].item() + math.log(v)) <= _lp_tolerance(z64)  # a flat row: log(1/V)
    assert not bad.any()


def _draw(z, n_launch, **kw):
    counts = torch.zeros(z.shape[1], dtype=torch.long)
    for off in range(n_launch):
        ids, _, bad = combine_and_sample(z, None, do_sample=True, seed=123, offset=off, backend="triton", **kw)
        assert not bad.any()
        counts += torch.bincount(ids, minlength=z.shape[1])
    return counts


SETTINGS = [
    dict(temperature=0.7),
    dict(temperature=1.3, top_k=5),
    dict(temperature=1.0, top_p=0.8),
    dict(temperature=1.0, min_p=0.1),
]


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_distribution_v111(setting):
    z1 = _peaked(111, seed=len(str(setting)))
    z = z1.expand(4096, -1).contiguous()
    n_launch = 3
    # the one warper of the setting changes the distribution beyond what the check allows over these draws
    (exact,) = assert_each_warper_matters([z1[0]], setting, n_launch * 4096, str(setting))
    assert_matches_distribution(_draw(z, n_launch, **setting), exact, str(setting))


def _designed_row(v: int, head: list[float], filler_mass: float, temperature: float, seed: int) -> torch.Tensor:
    """Logits [V] whose distribution after dividing by ``temperature`` gives the tokens of ``head`` those
    probabilities and spreads ``filler_mass`` evenly over the other V - len(head) tokens, at random positions."""
    n_fill = v - len(head)
    logp = torch.tensor(head + [filler_mass / n_fill] * n_fill, dtype=torch.float64).log()
    z = torch.empty(v, dtype=torch.float64)
    z[torch.randperm(v, generator=torch.Generator().manual_seed(seed))] = logp * temperature
    return z.float()


# All four warpers on, on two kinds of rows (a single row cannot make all four matter: see
# sampling_oracle.assert_each_warper_matters). Probabilities after temperature 0.7:
#   row A: .26 .23 .21 .20 .05 .03 + .02 spread. top_k=4 keeps 4 (renormalised: .289 .256 .233 .222); top_p=0.75
#          drops the .222 (<= 1 - .75) -> 3 tokens. Without top_k, top_p sees the tail too (.10 + .20 > .25) and keeps
#          4 tokens; without top_p, 4 tokens. min_p=0.25 removes nothing here (.20 / .26 = .77).
#   row B: .50 .14 .12 .115 + .125 spread. top_k keeps 4, top_p keeps 3 (.137 + .131 > .25), min_p removes the .12
#          (.12 / .50 = .24 < .25) -> 2 tokens; without min_p 3; temperature 1 instead of 0.7 changes it a lot.
ALL_FOUR = dict(temperature=0.7, top_k=4, top_p=0.75, min_p=0.25)
ROW_A = ([0.26, 0.23, 0.21, 0.20, 0.05, 0.03], 0.02)
ROW_B = ([0.50, 0.14, 0.12, 0.115], 0.125)


@pytest.mark.parametrize("v, n_per_row", [(111, 1024), (600, 512)], ids=["V111", "V600-two-blocks"])
def test_all_four_warpers_each_shape_the_distribution(v, n_per_row):
    """Temperature, top_k, top_p and min_p together: the drawn frequencies of each row match the exact warped
    distribution, and dropping any one warper would change some row's distribution detectably (checked below).
    V=600 spreads the kept tokens over two kernel blocks (BLOCK=512 in the interpreter)."""
    rows = [_designed_row(v, *ROW_A, 0.7, seed=v), _designed_row(v, *ROW_B, 0.7, seed=v + 1)]
    exact = assert_each_warper_matters(rows, ALL_FOUR, n_per_row, f"V={v}")
    assert [int((p > 0).sum()) for p in exact] == [3, 2]
    z = torch.stack(rows).repeat(n_per_row, 1)  # rows alternate A, B, A, B, ...
    ids, _, bad = combine_and_sample(z, None, do_sample=True, seed=11, offset=0, backend="triton", **ALL_FOUR)
    assert not bad.any()
    for r, p in enumerate(exact):
        assert_matches_distribution(torch.bincount(ids[r::2], minlength=v), p, f"V={v} row {'AB'[r]}")


def pushed(z_base: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """What a vocabulary map makes of base logits, written out: the base's distribution pushed through W,
    log(softmax(z_base) @ W), with 1e-30 as the probability of a value token nothing maps to."""
    return torch.log((torch.softmax(z_base, dim=-1) @ w).clamp_min(1e-30))


def test_distribution_through_a_vocab_map():
    """Cross-vocabulary: 150 base tokens mapped onto 111 value tokens (up to 3 base tokens each)."""
    g = torch.Generator().manual_seed(4)
    w = torch.zeros(150, 111)
    for u in range(150):
        targets = torch.randint(0, 111, (torch.randint(1, 3, (1,), generator=g).item(),), generator=g)
        w[u, targets] = torch.rand(len(targets), generator=g)
    vmap = VocabMap.from_dense(w)
    base1 = torch.randn(1, 150, generator=g) * 1.5  # flat enough that top-k and top-p each cut a pushed row
    value1 = torch.randn(1, 111, generator=g)
    kw = dict(temperature=0.8, top_k=10, top_p=0.9)
    z64 = pushed(base1.double(), w.double()) + 0.5 * value1.double()  # the map and the add, in float64
    (exact,) = assert_each_warper_matters([z64[0]], kw, 3 * 4096, "through the map")
    base, value = base1.expand(4096, -1).contiguous(), value1.expand(4096, -1).contiguous()
    counts = torch.zeros(111, dtype=torch.long)
    for off in range(3):
        ids, _, _ = combine_and_sample(
            base, value, vocab_map=vmap, alpha=0.5, do_sample=True, seed=5, offset=off, backend="triton", **kw
        )
        counts += torch.bincount(ids, minlength=111)
    assert_matches_distribution(counts, exact, "through the map")
    # a map that dropped the base side (value logits alone) would be caught
    assert_distinguishes(exact, warped_probs64(0.5 * value1[0].double(), **{**WARPER_OFF, **kw})[0], 3 * 4096)
    # greedy through the map equals the reference exactly
    gi, _, _ = combine_and_sample(base[:4], value[:4], vocab_map=vmap, alpha=0.5, backend="triton")
    ri, _, _ = combine_and_sample(base[:4], value[:4], vocab_map=vmap, alpha=0.5, backend="torch")
    assert gi.tolist() == ri.tolist()


def test_per_row_parameters_and_greedy_rows():
    z = _peaked(111, seed=2).expand(8, -1).contiguous()
    temps = torch.tensor([0.0, 1.0, 0.0, 0.7, 1.0, 0.0, 1.5, 0.9])
    ks = torch.tensor([0, 1, 0, 3, 0, 0, 1, 2])
    ids, _, _ = combine_and_sample(z, None, do_sample=True, temperature=temps, top_k=ks, seed=0, backend="triton")
    top = z[0].argmax().item()
    for i in range(8):
        if temps[i] == 0 or ks[i] == 1:  # greedy rows and top_k=1 rows must give the argmax
            assert ids[i].item() == top
        if ks[i] > 0:
            assert ids[i].item() in z[0].topk(int(ks[i])).indices.tolist()


# Per-row parameters, one group of rows each (row i belongs to group i % 4), all on the same logits row.
#   group 0: t=0 -> greedy (argmax only); group 1: top_p alone binds; group 2: min_p alone binds;
#   group 3: hot, with top_k, top_p and min_p all set. Every group's distribution is far from what any other group's
#   parameters would give (checked), so a kernel reading another row's top_p / min_p / temperature fails.
ROW_GROUPS = [
    dict(temperature=0.0, top_k=0, top_p=0.9, min_p=0.0),  # filters that would leave several tokens if it sampled
    dict(temperature=1.0, top_k=0, top_p=0.6, min_p=0.0),
    dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.3),
    dict(temperature=1.5, top_k=5, top_p=0.95, min_p=0.1),
]


def _group_exact(z: torch.Tensor, g: dict) -> torch.Tensor:
    if g["temperature"] == 0:  # greedy: all the mass on the lowest-index maximum
        return torch.nn.functional.one_hot(torch.tensor(z.tolist().index(max(z.tolist()))), len(z)).double()
    p, margin = warped_probs64(z, **g)
    assert margin > 1e-4, f"test design: {g} has a cut decision within {margin:.2g} of its threshold"
    return p


def test_per_row_top_p_min_p_temperature_tensors_by_distribution():
    v, n_group = 111, 1024
    z1 = _designed_row(v, [0.40, 0.25, 0.15, 0.08, 0.05, 0.03], 0.04, 1.0, seed=8)
    exact = [_group_exact(z1, g) for g in ROW_GROUPS]
    assert [int((p > 0).sum()) for p in exact] == [1, 2, 3, 5]
    for a, pa in enumerate(exact):  # test design: no group can pass with another group's parameters
        for b, pb in enumerate(exact):
            if a != b:
                assert_distinguishes(pa, pb, n_group, f"group {a} with group {b}'s parameters")
    per_row = {k: torch.tensor([g[k] for g in ROW_GROUPS]).repeat(n_group) for k in WARPER_OFF}
    z = z1.expand(len(ROW_GROUPS) * n_group, v).contiguous()
    ids, _, bad = combine_and_sample(z, None, do_sample=True, seed=4, offset=2, backend="triton", **per_row)
    assert not bad.any()
    for a, p in enumerate(exact):
        assert_matches_distribution(torch.bincount(ids[a :: len(ROW_GROUPS)], minlength=v), p, f"group {a}")


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sampled_logprobs_are_those_of_the_unwarped_combined_distribution(backend, dtype):
    """return_logprobs gives log softmax(map(z_base) + alpha z_value)[id] for the id drawn, before temperature and
    the filters (the documented semantics of the decoder's logprobs), whatever the temperature."""
    g = torch.Generator().manual_seed(6)
    v_base, v, b = 700, 600, 32  # 600 columns: two blocks of the kernel
    w = torch.zeros(v_base, v)
    w[torch.arange(v_base), torch.randint(0, v, (v_base,), generator=g)] = torch.rand(v_base, generator=g) + 0.5
    vmap = VocabMap.from_dense(w)
    base = (torch.randn(b, v_base, generator=g) * 3).to(dtype)
    value = (torch.randn(b, v, generator=g) * 2).to(dtype)
    z64 = pushed(base.double(), w.double()) + 0.5 * value.double()  # [B, V]: what the kernel combines, in float64
    tol = _lp_tolerance(z64)
    for temperature, kw in [(0.5, dict(top_k=40)), (1.7, dict(top_p=0.9, min_p=0.02)), (1.0, dict(top_k=5))]:
        ids, lp, _ = combine_and_sample(
            base,
            value,
            vocab_map=vmap,
            alpha=0.5,
            do_sample=True,
            temperature=temperature,
            seed=9,
            backend=backend,
            return_logprobs=True,
            generator=torch.Generator().manual_seed(9),
            **kw,
        )
        rows = torch.arange(b)
        err = (lp.double() - log_softmax64(z64)[rows, ids]).abs().max().item()
        assert err <= tol, f"t={temperature} {kw}: logprob error {err:.2e} > {tol:.2e}"
        # test design: the warped distribution's log-probabilities (after temperature and filters) are far from
        # these, so returning them instead would fail the check above
        warped = torch.stack([warped_probs64(z64[r], temperature, **kw)[0] for r in range(b)])[rows, ids].log()
        assert (lp.double() - warped).abs().max().item() > 1e3 * tol, f"t={temperature} {kw}: looks warped"


def test_seed_and_offset_reproducibility():
    z = _peaked(111, seed=3, scale=0.5).expand(64, -1).contiguous()
    a = combine_and_sample(z, None, do_sample=True, seed=7, offset=3, backend="triton")[0]
    b = combine_and_sample(z, None, do_sample=True, seed=7, offset=3, backend="triton")[0]
    c = combine_and_sample(z, None, do_sample=True, seed=7, offset=4, backend="triton")[0]
    d = combine_and_sample(z, None, do_sample=True, seed=8, offset=3, backend="triton")[0]
    seed_t, off_t = torch.tensor([7]), torch.tensor([3])  # device tensors, as a captured graph would pass
    e = combine_and_sample(z, None, do_sample=True, seed=seed_t, offset=off_t, backend="triton")[0]
    assert torch.equal(a, b) and torch.equal(a, e)
    assert not torch.equal(a, c) and not torch.equal(a, d)


def test_nonfinite_rows_are_flagged():
    z = torch.randn(4, 111)
    z[1, 5] = float("nan")
    z[3, 0] = float("inf")
    _, _, bad = combine_and_sample(z, torch.zeros_like(z), backend="triton")
    assert bad.tolist() == [False, True, False, True]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(top_p=0.0, do_sample=True), "top_p must be in (0, 1] (1 disables it), got 0.0"),
        (dict(top_p=-0.5, do_sample=True), "top_p must be in (0, 1] (1 disables it), got -0.5"),
        (dict(temperature=-1.0), "temperature must be a finite number >= 0 that float32 holds, got -1.0"),
        (dict(value_logits=torch.zeros(4, 100)), "base vocabulary (111) != value vocabulary (100) and no vocab_map"),
        (dict(value_logits=torch.zeros(3, 111)), "batch sizes differ: base 4, value 3"),
        (
            dict(base_logits=torch.zeros(4, 111, dtype=torch.int64)),
            "base_logits must be float32/float16/bfloat16, got torch.int64",
        ),
        (dict(base_logits=torch.zeros(4, 111, 2)), "base_logits must be [B, V], got shape (4, 111, 2)"),
        (dict(value_logits=torch.zeros(4, 111, 2)), "value_logits must be [B, V], got shape (4, 111, 2)"),
        (
            dict(vocab_map=VocabMap.from_dense(torch.eye(50, 111))),
            "vocab_map expects 50 base logits per row, base_logits has 111",
        ),
        (
            dict(vocab_map=VocabMap.from_dense(torch.eye(111, 90))),
            "vocab_map maps to 90 value tokens, value_logits has 111",
        ),
        (
            dict(temperature=torch.ones(3), do_sample=True),
            "temperature must be a scalar or a [B=4] tensor, got shape (3,)",
        ),
        (
            dict(top_k=torch.ones(3, dtype=torch.long), do_sample=True),
            "top_k must be a scalar or a [B=4] tensor, got shape (3,)",
        ),
        (dict(top_p=torch.full((3,), 0.5), do_sample=True), "top_p must be a scalar or a [B=4] tensor, got shape (3,)"),
        (dict(min_p=torch.full((3,), 0.1), do_sample=True), "min_p must be a scalar or a [B=4] tensor, got shape (3,)"),
        (dict(seed=torch.tensor([1, 2]), do_sample=True), "seed must be a scalar or a [B=1] tensor, got shape (2,)"),
        (
            dict(offset=torch.tensor([1, 2]), do_sample=True),
            "offset must be a scalar or a [B=1] tensor, got shape (2,)",
        ),
        (dict(value_logits=torch.zeros(4, 111, device="meta")), "base_logits on cpu but value_logits on meta"),
        (dict(base_logits=None, value_logits=None), "combine_and_sample needs base_logits, value_logits or both"),
    ],
)
def test_bad_input_is_refused_with_a_message_naming_the_argument(kwargs, message):
    args = dict(base_logits=torch.zeros(4, 111), value_logits=torch.zeros(4, 111))
    args.update(kwargs)
    base, value = args.pop("base_logits"), args.pop("value_logits")
    with pytest.raises(ValueError) as err:
        combine_and_sample(base, value, backend="triton", **args)
    assert str(err.value) == message  # the whole message: which argument, what it must be, what it got


def _op_inputs(base, value, **sampling):
    """The registered op's input list (the kernel's INPUTS, in order) for these logits and sampling keywords."""
    from ivl_fast.kernels.combine_and_sample import INPUTS
    from ivl_fast.ops.row_sampling import RowSampling

    ref = base if base is not None else value
    x = RowSampling.checked(ref.shape[0], ref.shape[1], ref.device, **sampling).kernel_inputs(ref.shape[0], ref.device)
    x.update(base=base, value=value)
    return [x.get(n) for n in INPUTS]


@pytest.mark.parametrize("base_only", [False, True])
@pytest.mark.parametrize("sampled", [False, True])
def test_the_registered_ops_fake_agrees_with_the_kernel(base_only, sampled):
    """torch.library.opcheck: the schema, and the fake (meta) implementation that torch.compile and graph capture
    trace with gives the kernel's output shapes and dtypes ([B] int64 ids, [B] fp32 logprobs, [B] bool flags)."""
    from ivl_fast.ops.combine_and_sample import _triton_op

    b, v = 3, 111
    g = torch.Generator().manual_seed(0)
    base, value = torch.randn(b, v, generator=g), None if base_only else torch.randn(b, v, generator=g)
    sampling = (
        dict(do_sample=True, temperature=torch.ones(b), top_k=torch.zeros(b, dtype=torch.int64)) if sampled else {}
    )
    args = (_op_inputs(base, value, **sampling), v, 1.0, None)
    torch.library.opcheck(_triton_op, args, test_utils=("test_schema", "test_faketensor"))


def test_the_kernels_argument_table_is_its_signature():
    """ARGS (the one list of the kernel's runtime arguments: launch passes them by keyword, the AOT specs and the
    op's inputs come from it) names the kernel's parameters in order, constexprs aside; INPUTS are its pointers
    that a caller gives, named without "_ptr", and every sampling input RowSampling can give is one of them."""
    from ivl_fast.kernels import combine_and_sample as k
    from ivl_fast.ops.row_sampling import RowSampling

    fn = getattr(k._combine_sample_kernel, "fn", k._combine_sample_kernel)
    params = list(inspect.signature(fn).parameters)
    constexprs = [n for n in params if n.isupper() and n not in ("B", "V")]
    assert [n for n in params if n not in constexprs] == list(k.ARGS)
    assert set(k.AOT_SPECS[0][2]) == set(constexprs)
    assert k.INPUTS[:2] == ("base", "value") and all(n + "_ptr" in k.ARGS for n in k.INPUTS)
    b, v = 2, 7
    z = torch.zeros(b, v)
    every = RowSampling.checked(
        b,
        v,
        z.device,
        do_sample=True,
        top_k=torch.ones(b, dtype=torch.int64),
        top_p=0.5,
        min_p=0.1,
        repetition_penalty=1.2,
        prompt_mask=torch.zeros(b, v, dtype=torch.bool),
        output_counts=torch.zeros(b, v, dtype=torch.int32),
        row_seed=torch.zeros(b, dtype=torch.int64),
        row_step=torch.zeros(b, dtype=torch.int64),
        seeded=torch.zeros(b, dtype=torch.bool),
    ).kernel_inputs(b, z.device)
    assert set(every) <= set(k.INPUTS) and all(t is not None for t in every.values())
    assert set(k.INPUTS) - set(every) == {"base", "value", "map_idx", "map_w", "terms", "term_weights"}
    greedy = RowSampling.checked(b, v, z.device).kernel_inputs(b, z.device)
    assert greedy == {}  # a greedy batch without penalties switches every sampling path off


def test_top_k_keeps_every_token_tied_at_the_kth_logit():
    """transformers' top-k removes only logits below the k-th largest: with k=3 and the 3rd value shared by three
    tokens, five tokens stay (checked by distribution against the oracle, which keeps ties the same way)."""
    z = torch.full((1, 111), -4.0)
    z[0, :5] = torch.tensor([2.0, 1.5, 1.0, 1.0, 1.0])
    z = z.expand(2048, -1).contiguous()
    p = warped_probs64(z[0].double(), 1.0, 3, 1.0, 0.0)[0]
    assert int((p > 0).sum()) == 5
    ids = combine_and_sample(z, None, do_sample=True, top_k=3, seed=0, backend="triton")[0]
    assert_matches_distribution(torch.bincount(ids, minlength=111), p, "top_k=3 with ties at the 3rd logit")


def test_pick_backend_names_the_backend_each_request_gets():
    """torch stays torch; triton runs on CPU only in the interpreter (these tests set TRITON_INTERPRET=1); auto
    picks the kernel on CUDA only (on CPU the interpreter is far slower than the torch reference)."""
    from ivl_fast.ops._backend import pick_backend

    cpu = torch.device("cpu")
    assert [pick_backend(b, cpu) for b in ("torch", "triton", "auto")] == ["torch", "triton", "torch"]


def test_the_backend_is_the_one_asked_for():
    """backend="torch" draws from the given torch.Generator (the kernel ignores it: it draws from seed/offset),
    backend="triton" from the seed; an unknown backend is refused by name."""
    z = torch.randn(64, 111, generator=torch.Generator().manual_seed(2))

    def draw(backend, gen_seed, seed=0):
        gen = torch.Generator().manual_seed(gen_seed)
        return combine_and_sample(z, None, do_sample=True, backend=backend, generator=gen, seed=seed)[0]

    assert torch.equal(draw("torch", 1), draw("torch", 1)) and not torch.equal(draw("torch", 1), draw("torch", 2))
    assert torch.equal(draw("triton", 1), draw("triton", 2)) and not torch.equal(
        draw("triton", 1, 0), draw("triton", 1, 5)
    )
    with pytest.raises(ValueError) as err:
        combine_and_sample(z, None, backend="cuda")
    assert str(err.value) == "backend must be one of ('auto', 'triton', 'torch'), got 'cuda'"


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_defaults_are_greedy_base_plus_value_at_alpha_1_temperature_1_offset_0_without_logprobs(backend):
    """Called with logits only, the op is greedy on base + 1.0 * value and returns no log-probabilities; sampling
    with only a seed draws as at temperature 1, offset 0 (the documented defaults, checked by behaviour)."""
    g = torch.Generator().manual_seed(5)
    base, value = torch.randn(64, 111, generator=g), torch.randn(64, 111, generator=g)
    ids, lp, bad = combine_and_sample(base, value, backend=backend)
    z64 = base.double() + value.double()
    assert torch.equal(ids, z64.argmax(-1)) and lp is None and not bad.any()
    assert not torch.equal(ids, (base.double() + 2 * value.double()).argmax(-1))  # alpha matters on these rows
    kw = dict(do_sample=True, backend=backend)
    rng = (lambda: dict(generator=torch.Generator().manual_seed(9))) if backend == "torch" else (lambda: dict(seed=9))
    drawn = combine_and_sample(base, value, **kw, **rng())[0]
    assert torch.equal(drawn, combine_and_sample(base, value, temperature=1.0, offset=0, **kw, **rng())[0])
    assert not torch.equal(drawn, combine_and_sample(base, value, temperature=2.0, offset=0, **kw, **rng())[0])
    if backend == "triton":  # the Philox offset only exists in the kernel
        assert not torch.equal(drawn, combine_and_sample(base, value, offset=1, **kw, **rng())[0])


def test_top_p_keeps_only_as_many_tied_boundary_tokens_as_fit():
    """Three tokens tied below the top one, the top-p cut falling inside the tie: a stable ascending sort (HF's
    top-p) removes the lowest index of the three and keeps the other two, so some but not all of the tied tokens
    stay (probabilities 0.475 | 0.175 x 3 | ~0; top_p = 0.75 keeps the mass above 1 - 0.75 = 0.25: the running sum
    passes it at the second tied token). The kernel keeps exactly those: every one of them is drawn, no other."""
    z = torch.tensor([[2.0, 1.0, 1.0, 1.0, -5.0]])
    exact, margin = warped_probs64(z[0], top_p=0.75)
    assert (exact > 0).tolist() == [True, False, True, True, False] and margin > 0.1  # the oracle's own reading
    ids, _, _ = combine_and_sample(
        z.expand(1024, 5).contiguous(), None, do_sample=True, top_p=0.75, seed=3, backend="triton"
    )
    assert set(ids.tolist()) == {0, 2, 3}


def test_top_p_boundary_ties_resolved_like_a_stable_sort():
    """Tied logits straddling the top-p cut: keep exactly the tokens a stable ascending sort keeps."""
    z = torch.tensor([[1.0, 1.0, 0.0, -1.0]]).expand(1024, 4).contiguous()
    ids, _, _ = combine_and_sample(z, None, do_sample=True, top_p=0.3, seed=1, backend="triton")
    assert (warped_probs64(z[0], top_p=0.3)[0] > 0).tolist() == [False, True, False, False]
    assert set(ids.tolist()) == {1}
    # bf16-rounded logits (many ties, as real bf16 models give): never a token the reference excludes
    g = torch.Generator().manual_seed(0)
    for trial in range(4):
        z1 = (torch.randn(1, 300, generator=g) * 2).bfloat16().float()
        for p in (0.2, 0.444, 0.9):
            exact, margin = warped_probs64(z1[0], temperature=0.8, top_k=40, top_p=p)
            assert margin > 1e-4, (trial, p)  # test design: fp32 and float64 cannot disagree on this row
            allowed = exact > 0
            zz = z1.expand(256, -1).contiguous()
            ids, _, _ = combine_and_sample(
                zz, None, do_sample=True, temperature=0.8, top_k=40, top_p=p, seed=trial, backend="triton"
            )
            assert bool(allowed[ids].all()), (trial, p)
