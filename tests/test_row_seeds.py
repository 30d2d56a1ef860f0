"""Per-row seeds: a row with its own seed draws from Philox(seed; column, 0, step) on both samplers.

The torch Philox is checked bit for bit against Triton's own ``tl.philox`` (interpreter); the fused kernel and the
torch path then draw the same ids for seeded rows; a seeded row's ids do not depend on its slot or on what else
shares the batch; over many seeds the draws follow the exact warped distribution.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import triton
import triton.language as tl
from sampling_oracle import assert_matches_distribution, warped_probs64

from ivl_fast.ops.combine_and_sample import combine_and_sample
from ivl_fast.philox import row_uniforms

warnings.filterwarnings("ignore", category=RuntimeWarning)  # numpy log(0) inside the interpreter
# the fused kernel runs where Triton can: on the GPU when there is one (then these tests validate the compiled
# kernel against the torch path on CPU), else in the interpreter on CPU
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _philox_rows(seed_ptr, step_ptr, out_ptr, V, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    seed = tl.load(seed_ptr + r)
    step = tl.load(step_ptr + r)
    cols = tl.arange(0, BLOCK)
    zero = tl.zeros([BLOCK], tl.uint32)
    c2 = (step & 0xFFFFFFFF).to(tl.uint32) + zero
    c3 = ((step >> 32) & 0xFFFFFFFF).to(tl.uint32) + zero
    x, _a, _b, _c = tl.philox(seed + tl.zeros([BLOCK], tl.int64), cols.to(tl.uint32), zero, c2, c3)
    tl.store(out_ptr + r * V + cols, tl.uint_to_uniform_float(x), mask=cols < V)


def test_torch_philox_equals_tritons_bit_for_bit():
    seed = torch.tensor([0, 1, -5, 2**40 + 7, -(2**62), 2**63 - 1], dtype=torch.int64)
    step = torch.tensor([0, 3, 2**33 + 1, 17, 5, 2**32 - 1], dtype=torch.int64)
    out = torch.zeros(len(seed), 128, device=KERNEL_DEVICE)
    _philox_rows[(len(seed),)](seed.to(KERNEL_DEVICE), step.to(KERNEL_DEVICE), out, 128, BLOCK=128)
    ref = row_uniforms(seed, step, 128)
    assert torch.equal(out.cpu(), ref)
    assert 0.4 < ref.mean() < 0.6 and ref.min() >= 0 and ref.max() < 1
    # counters matter: another step, another seed -> other numbers
    assert not torch.equal(row_uniforms(seed, step + 1, 128), ref)
    assert not torch.equal(row_uniforms(seed + 1, step, 128), ref)


WARP = dict(temperature=0.8, top_k=40, top_p=0.9, min_p=0.02)


def _seeded_draw(z, seeds, steps, seeded, backend, **kw):
    dev = KERNEL_DEVICE if backend == "triton" else "cpu"
    z, seeds, steps, seeded = (t.to(dev) for t in (z, seeds, steps, seeded))
    return combine_and_sample(
        z,
        None,
        do_sample=True,
        seed=99,
        offset=3,
        generator=torch.Generator(device=dev).manual_seed(5),
        backend=backend,
        row_seed=seeds,
        row_step=steps,
        seeded=seeded,
        **{**WARP, **kw},
    )[0].cpu()


def test_the_kernel_and_the_torch_path_draw_the_same_ids_for_seeded_rows():
    g = torch.Generator().manual_seed(0)
    b, v = 64, 300
    z = torch.randn(b, v, generator=g) * 2
    seeds = torch.randint(-(2**40), 2**40, (b,), generator=g)
    steps = torch.randint(0, 1000, (b,), generator=g)
    seeded = torch.ones(b, dtype=torch.bool)
    kernel = _seeded_draw(z, seeds, steps, seeded, "triton")
    ref = _seeded_draw(z, seeds, steps, seeded, "torch")
    # the same uniforms; the scores are computed in two float orders, so an exact tie could split (none here)
    assert torch.equal(kernel, ref)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_seeded_row_draws_the_same_ids_in_any_slot_and_any_batch(backend):
    g = torch.Generator().manual_seed(1)
    v = 200
    row = torch.randn(1, v, generator=g) * 2
    seed = torch.tensor([1234])
    alone = [_seeded_draw(row, seed, torch.tensor([s]), torch.tensor([True]), backend)[0] for s in range(12)]
    for slot, b in ((0, 3), (4, 7)):
        z = torch.randn(b, v, generator=g) * 2
        z[slot] = row[0]
        seeds = torch.randint(0, 2**30, (b,), generator=g)
        seeds[slot] = 1234
        seeded = torch.rand(b, generator=g) < 0.5
        seeded[slot] = True
        got = [_seeded_draw(z, seeds, torch.full((b,), s), seeded, backend, temperature=0.8)[slot] for s in range(12)]
        assert torch.stack(got).tolist() == torch.stack(alone).tolist(), (slot, b)
    # the draws move with the step (not one token repeated), and other seeds draw otherwise
    assert len(set(torch.stack(alone).tolist())) > 3
    other = [
        _seeded_draw(row, torch.tensor([77]), torch.tensor([s]), torch.tensor([True]), backend)[0] for s in range(12)
    ]
    assert torch.stack(other).tolist() != torch.stack(alone).tolist()


def test_unseeded_rows_keep_the_batch_stream():
    """Flagging no row changes nothing: the unseeded rows draw what they drew without per-row seeds."""
    g = torch.Generator().manual_seed(2)
    z = torch.randn(16, 100, generator=g) * 2
    none = torch.zeros(16, dtype=torch.bool)
    for backend in ("torch", "triton"):
        dev = KERNEL_DEVICE if backend == "triton" else "cpu"
        plain = combine_and_sample(
            z.to(dev),
            None,
            do_sample=True,
            seed=99,
            offset=3,
            generator=torch.Generator(device=dev).manual_seed(5),
            backend=backend,
            **WARP,
        )[0].cpu()
        flagged = _seeded_draw(z, torch.zeros(16, dtype=torch.int64), torch.zeros(16, dtype=torch.int64), none, backend)
        assert torch.equal(plain, flagged), backend


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_seeded_draws_follow_the_warped_distribution(backend):
    """Over many seeds (one row each, step 0), the drawn tokens match the exact warped distribution."""
    g = torch.Generator().manual_seed(3)
    v, n = 50, 4096
    row = torch.randn(v, generator=g) * 1.5
    exact, _margin = warped_probs64(row, **WARP)
    z = row.expand(n, -1).contiguous()
    seeds = torch.arange(n, dtype=torch.int64) * 7919 + 11
    ids = _seeded_draw(z, seeds, torch.zeros(n, dtype=torch.int64), torch.ones(n, dtype=torch.bool), backend)
    assert exact[ids].min() > 0  # nothing outside the kept set
    assert_matches_distribution(torch.bincount(ids, minlength=v), exact, backend)


def test_row_seeds_come_all_three_or_none():
    z = torch.randn(2, 10)
    with pytest.raises(ValueError, match="row_seed, row_step and seeded go together"):
        combine_and_sample(z, None, do_sample=True, row_seed=torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"seeded must be a \[B=2\] torch.bool tensor"):
        combine_and_sample(
            z,
            None,
            do_sample=True,
            row_seed=torch.zeros(2, dtype=torch.int64),
            row_step=torch.zeros(2, dtype=torch.int64),
            seeded=torch.zeros(2, dtype=torch.int64),
        )
