"""An independent float64 oracle for the sampling tests (test_sampling.py, test_combine_and_sample.py).

``warped_probs64`` is written from the definition of transformers' warpers (temperature -> top_k -> top_p ->
min_p, min_tokens_to_keep=1), in Python floats (double precision), without calling anything in ivl_fast, so a
bug shared by ``ivl_fast.sampling.warp_logits`` and the kernel cannot hide behind it. It also reports how close
the row's cut decisions come to their thresholds: the fp32 code under test and this float64 oracle may only
disagree on a decision closer than fp32 rounding, so a test asserts that this margin is large.

The statistical helpers size sampling checks from the noise of the empirical distribution instead of a fixed
percentage, and check that a test can tell the right distribution from a wrong one (a sampler that skipped one
warper must fail it).
"""

from __future__ import annotations

import math

import torch

WARPER_OFF = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)  # the value that disables each warper


def _softmax_kept(x: list[float], keep: list[bool]) -> list[float]:
    m = max(xi for xi, k in zip(x, keep, strict=True) if k)
    e = [math.exp(xi - m) if k else 0.0 for xi, k in zip(x, keep, strict=True)]
    s = sum(e)
    return [ei / s for ei in e]


def warped_probs64(
    logits, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0
) -> tuple[torch.Tensor, float]:
    """One row of logits [V] -> (exact sampling distribution [V] float64, smallest relative cut margin).

    - temperature: x = z / t (t > 0);
    - top_k: keep x >= the k-th largest x (ties at the k-th value kept), k clamped to V; 0 = off;
    - top_p: q = softmax over the kept tokens; walk them in ascending order (ties: lower index first), removing
      each whose running sum of q is <= 1 - top_p, never the last (the top token); 1 = off;
    - min_p: q = softmax over the kept tokens; remove q < min_p * max(q), never the argmax; 0 = off.
    The margin is min over every top_p / min_p comparison of |lhs - rhs| / rhs (inf when none is made).
    """
    z = [float(v) for v in torch.as_tensor(logits).reshape(-1).tolist()]
    n = len(z)
    x = [zi / temperature for zi in z] if temperature > 0 else z
    keep = [True] * n
    margin = math.inf
    if top_k > 0:
        kth = sorted(x, reverse=True)[min(int(top_k), n) - 1]
        keep = [xi >= kth for xi in x]
    if top_p < 1:
        q = _softmax_kept(x, keep)
        order = sorted((i for i in range(n) if keep[i]), key=lambda i: (x[i], i))
        cut, cum = 1.0 - top_p, 0.0
        for i in order[:-1]:  # the last one (the top token) always stays
            cum += q[i]
            margin = min(margin, abs(cum - cut) / cut)
            if cum <= cut:
                keep[i] = False
            else:
                break  # running sums only grow: nothing later is removed
    if min_p > 0:
        q = _softmax_kept(x, keep)
        qmax = max(q)
        top = q.index(qmax)  # lowest index among tied maxima
        for i in range(n):
            if keep[i] and i != top:
                margin = min(margin, abs(q[i] - min_p * qmax) / (min_p * qmax))
                if q[i] < min_p * qmax:
                    keep[i] = False
    return torch.tensor(_softmax_kept(x, keep), dtype=torch.float64), margin


def log_softmax64(logits: torch.Tensor) -> torch.Tensor:
    """[B, V] -> float64 log-probabilities, written out (shift by the row max, log of the sum of exps)."""
    z = logits.double()
    m = z.amax(-1, keepdim=True)
    return z - m - (z - m).exp().sum(-1, keepdim=True).log()


# ---------------------------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------------------------

N_SIGMA = 5


def tv_bound(p: torch.Tensor, n: int) -> float:
    """A bound that the total-variation distance of n draws from p to p stays under (failure odds ~1e-6).

    E[TV] <= 1/2 sum_i sqrt(p_i (1 - p_i) / n) (Jensen, token by token), and TV's standard deviation is about
    1/2 sqrt((1 - 2/pi) sum_i p_i (1 - p_i) / n) (normal approximation); the bound is the mean bound + 5 sd.
    """
    var = (p * (1 - p)).double()
    mean = 0.5 * (var / n).sqrt().sum().item()
    sd = 0.5 * math.sqrt((1 - 2 / math.pi) * var.sum().item() / n)
    return mean + N_SIGMA * sd


def tv(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * (p.double() - q.double()).abs().sum().item()


def assert_matches_distribution(counts: torch.Tensor, exact: torch.Tensor, what: str = "") -> None:
    """counts [V] of n draws: no token outside exact's support, and TV(empirical, exact) <= tv_bound(exact, n)."""
    n = int(counts.sum())
    outside = (counts > 0) & (exact == 0)
    assert not outside.any(), f"{what}: drew tokens the warpers exclude: {outside.nonzero().flatten().tolist()}"
    dist, bound = tv(counts.double() / n, exact), tv_bound(exact, n)
    assert dist <= bound, f"{what}: TV {dist:.4f} > {bound:.4f} over {n} draws"


def distinguishes(exact: torch.Tensor, wrong: torch.Tensor, n: int, allowed: float | None = None) -> bool:
    """Whether n draws from ``wrong`` fail a check that allows TV ``allowed`` (default tv_bound(exact, n)) from exact.

    Draws from q land within tv_bound(q, n) of q (odds ~1e-6), so their TV to p is at least
    TV(p, q) - tv_bound(q, n); that must exceed what the check allows.
    """
    allowed = tv_bound(exact, n) if allowed is None else allowed
    return tv(exact, wrong) - tv_bound(wrong, n) > allowed


def assert_distinguishes(exact: torch.Tensor, wrong: torch.Tensor, n: int, what: str = "") -> None:
    """Test design: n draws from ``wrong`` fail assert_matches_distribution(., exact)."""
    assert distinguishes(exact, wrong, n), (
        f"test design: {what} gives a distribution only {tv(exact, wrong):.4f} (TV) from the right one; "
        f"{n} draws cannot tell them apart"
    )


def assert_each_warper_matters(rows: list, setting: dict, n: int, what: str = "") -> list[torch.Tensor]:
    """Test design for a batch of logit rows [V] sampled n times each with one ``setting``: every cut decision is far
    from its threshold, and for every active warper some row's n draws would fail the distribution check if a
    sampler skipped that warper. (One row cannot show all four: top_k, top_p and min_p each keep a prefix of the
    tokens sorted by probability, so only the shortest prefix matters, and min_p's is independent of the others.)
    Returns each row's exact distribution."""
    full = {**WARPER_OFF, **setting}
    exact = []
    for r, z in enumerate(rows):
        p, margin = warped_probs64(z, **full)
        assert margin > 1e-4, f"test design: {what} row {r} has a cut decision within {margin:.2g} of its threshold"
        exact.append(p)
    for name, off in WARPER_OFF.items():
        if full[name] != off:
            wrong = [warped_probs64(z, **{**full, name: off})[0] for z in rows]
            assert any(distinguishes(p, q, n) for p, q in zip(exact, wrong, strict=True)), (
                f"test design: {what}: no row's {n} draws tell a sampler without {name} from the right one"
            )
    return exact


def random_logits(b: int, v: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    """[b, v] seeded normal logits times ``scale`` (far from uniform at the default)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, v, generator=g) * scale
