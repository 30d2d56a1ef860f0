"""combine_and_sample: the Triton kernel (interpreter on CPU) against the torch reference of ivl_fast.sampling.

Greedy is exact (ties included); sampling is tested by distribution against the exact warped distribution,
and no token outside the allowed set may ever be drawn.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from ivl_fast.ops.combine_and_sample import combine_and_sample
from ivl_fast.sampling import warp_logits
from ivl_fast.vocab import VocabMap

warnings.filterwarnings("ignore", category=RuntimeWarning)  # numpy log(0) inside the interpreter


def _peaked(v: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, v, generator=g) * scale


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
    rids, rlp, _ = combine_and_sample(base, value, alpha=1.0, backend="torch", return_logprobs=True)
    assert ids.tolist() == rids.tolist()
    assert ids[0].item() == v // 3 and ids[2].item() == 0
    torch.testing.assert_close(lp, rlp, atol=1e-5, rtol=1e-5)
    assert not bad.any()


def _draw(z, n_launch, **kw):
    counts = torch.zeros(z.shape[1], dtype=torch.long)
    for off in range(n_launch):
        ids, _, bad = combine_and_sample(z, None, do_sample=True, seed=123, offset=off, backend="triton", **kw)
        assert not bad.any()
        counts += torch.bincount(ids, minlength=z.shape[1])
    return counts


def _check_distribution(counts, exact, max_tv=0.02):
    n = counts.sum().item()
    # test design: expected sampling noise of the TV distance must be well under the bound
    noise = 0.5 * (exact * (1 - exact) / n).sqrt().sum().item() * math.sqrt(2 / math.pi)
    assert noise < 0.6 * max_tv, f"too few draws for this distribution (expected TV noise {noise:.3f})"
    emp = counts.double() / n
    allowed = exact > 0
    assert counts[~allowed].sum().item() == 0, "drew a token that the warpers exclude"
    tv = 0.5 * (emp - exact.double()).abs().sum().item()
    assert tv <= max_tv, f"TV distance {tv:.4f} > {max_tv}"


SETTINGS = [
    dict(temperature=0.7),
    dict(temperature=1.3, top_k=5),
    dict(temperature=1.0, top_p=0.8),
    dict(temperature=1.0, min_p=0.1),
    dict(temperature=0.8, top_k=12, top_p=0.9, min_p=0.02),
]


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_distribution_v111(setting):
    z1 = _peaked(111, seed=len(str(setting)))
    z = z1.expand(4096, -1).contiguous()
    exact = warp_logits(
        z1, **{k: setting.get(k, d) for k, d in (("temperature", 1.0), ("top_k", 0), ("top_p", 1.0), ("min_p", 0.0))}
    ).softmax(-1)[0]
    _check_distribution(_draw(z, 3, **setting), exact)


def test_distribution_v1271_all_warpers():
    z1 = _peaked(1271, seed=10, scale=2.5)
    z = z1.expand(2048, -1).contiguous()
    kw = dict(temperature=0.9, top_k=8, top_p=0.95, min_p=0.01)
    exact = warp_logits(z1, **kw).softmax(-1)[0]
    _check_distribution(_draw(z, 2, **kw), exact)


def test_distribution_through_a_vocab_map():
    """Cross-vocabulary: 150 base tokens mapped onto 111 value tokens (up to 3 base tokens each)."""
    g = torch.Generator().manual_seed(4)
    w = torch.zeros(150, 111)
    for u in range(150):
        targets = torch.randint(0, 111, (torch.randint(1, 3, (1,), generator=g).item(),), generator=g)
        w[u, targets] = torch.rand(len(targets), generator=g)
    vmap = VocabMap.from_dense(w)
    base1 = torch.randn(1, 150, generator=g) * 3
    value1 = torch.randn(1, 111, generator=g)
    kw = dict(temperature=0.8, top_k=10, top_p=0.9)
    exact = warp_logits(base1 @ w + 0.5 * value1, **kw).softmax(-1)[0]
    base, value = base1.expand(4096, -1).contiguous(), value1.expand(4096, -1).contiguous()
    counts = torch.zeros(111, dtype=torch.long)
    for off in range(3):
        ids, _, _ = combine_and_sample(
            base, value, vocab_map=vmap, alpha=0.5, do_sample=True, seed=5, offset=off, backend="triton", **kw
        )
        counts += torch.bincount(ids, minlength=111)
    _check_distribution(counts, exact)
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
    "kwargs, match",
    [
        (dict(top_p=0.0, do_sample=True), "top_p must be"),
        (dict(top_p=-0.5, do_sample=True), "top_p must be"),
        (dict(temperature=-1.0), "temperature must be"),
        (dict(value_logits=torch.zeros(4, 100)), "vocabulary"),
        (dict(value_logits=torch.zeros(3, 111)), "batch sizes differ"),
        (dict(base_logits=torch.zeros(4, 111, dtype=torch.int64)), "float32/float16/bfloat16"),
        (dict(base_logits=torch.zeros(4, 111, 2)), r"must be \[B, V\]"),
        (dict(vocab_map=VocabMap.from_dense(torch.eye(50, 111))), "vocab_map expects 50"),
        (dict(vocab_map=VocabMap.from_dense(torch.eye(111, 90))), "maps to 90 value tokens"),
        (dict(temperature=torch.ones(3), do_sample=True), r"temperature must be a scalar or a \[B=4\]"),
        (dict(value_logits=torch.zeros(4, 111, device="meta")), "base_logits on cpu but value_logits on meta"),
    ],
)
def test_bad_input(kwargs, match):
    args = dict(base_logits=torch.zeros(4, 111), value_logits=torch.zeros(4, 111))
    args.update(kwargs)
    base, value = args.pop("base_logits"), args.pop("value_logits")
    with pytest.raises(ValueError, match=match):
        combine_and_sample(base, value, backend="triton", **args)


def test_top_p_boundary_ties_resolved_like_a_stable_sort():
    """Tied logits straddling the top-p cut: keep exactly the tokens a stable ascending sort keeps."""
    z = torch.tensor([[1.0, 1.0, 0.0, -1.0]]).expand(1024, 4).contiguous()
    ids, _, _ = combine_and_sample(z, None, do_sample=True, top_p=0.3, seed=1, backend="triton")
    assert torch.isfinite(warp_logits(z[:1], top_p=0.3))[0].tolist() == [False, True, False, False]
    assert set(ids.tolist()) == {1}
    # bf16-rounded logits (many ties, as real bf16 models give): never a token the reference excludes
    g = torch.Generator().manual_seed(0)
    for trial in range(4):
        z1 = (torch.randn(1, 300, generator=g) * 2).bfloat16().float()
        for p in (0.2, 0.444, 0.9):
            allowed = torch.isfinite(warp_logits(z1, temperature=0.8, top_k=40, top_p=p))[0]
            zz = z1.expand(256, -1).contiguous()
            ids, _, _ = combine_and_sample(
                zz, None, do_sample=True, temperature=0.8, top_k=40, top_p=p, seed=trial, backend="triton"
            )
            assert bool(allowed[ids].all()), (trial, p)
