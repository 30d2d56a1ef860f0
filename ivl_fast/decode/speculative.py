"""Speculative IVL decoding, one round as free functions (what a graph captures): a small draft base plus the
value network propose ``k`` tokens, the large base verifies them in one forward over k + 1 positions, and each
row keeps the longest accepted prefix plus one token.

Distributions (the same warping for both, :mod:`ivl_fast.sampling`'s reference: penalties, then temperature ->
top_k -> top_p -> min_p):

- draft  q_j = warp(z_draft_j + alpha * z_value_j)
- target p_j = warp(z_base_j  + alpha * z_value_j)

The value network reads the same tokens in both, so its logits at the k + 1 positions are computed once, in the
draft phase, and reused by the verify. Acceptance is exact speculative sampling (Leviathan et al. 2023; Chen et
al. 2023): accept x_j with probability min(1, p_j(x_j) / q_j(x_j)); at the first rejection sample from
norm(max(0, p_j - q_j)); when all k are accepted, a bonus token from p_k. The output is then distributed
exactly as plain IVL sampling. Greedy rows (q, p one-hot at their argmax, lowest index on ties) accept x_j iff
it is the target's argmax, so the output is plain IVL greedy decoding token for token.

A round, per row of the batch [B] (shapes in brackets):
  feed y (the row's pending token), x_0 .. x_{k-1} to the value network (k + 1 steps) and [p, y], x_0 .. x_{k-2}
  to the draft (k steps, the first a two-token extend: p is the token before y, which the draft's cache lacks,
  so the draft never computes logits nobody uses) -> base.extend([y, x_0 .. x_{k-1}]) [B, k + 1, V] -> accept /
  correct -> emit up to k + 1 tokens (cut at EOS and at the row's budget) -> rewind every model's KV to what the
  row kept (the draft's to one token less).
No host sync inside (static shapes for a static k); penalties count the drafted tokens position by position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..sampling import SamplingParams, _col, apply_penalties, combine_logits, warp_logits
from .buffers import DecodeBuffers
from .model_set import ModelSet


@dataclass(frozen=True)
class SpecConfig:
    """k: tokens drafted per round; what else the round's code depends on (a graph is captured per value)."""

    k: int
    sampling: SamplingParams
    return_logprobs: bool
    n_eos: int

    def graph_key(self, kv_len: int, alpha: float) -> tuple:
        sp = self.sampling
        sampling = ("greedy",) if sp.greedy else ("sample", sp.top_k_on, sp.top_p_on, sp.min_p_on)
        return ("speculative", self.k, kv_len, sampling, sp.penalties_on, self.return_logprobs, self.n_eos, alpha)


@dataclass
class SpecState:
    """What rounds carry besides the decode buffers: ``prev`` [B], each row's token before its pending one (the
    draft has read neither: a round's first draft step reads both, so the draft never runs a step whose logits go
    unused); device counters of drafted and accepted tokens of live rows (read once at the end)."""

    prev: torch.Tensor  # [B] int64
    drafted: torch.Tensor  # [] int64
    accepted: torch.Tensor  # [] int64

    @classmethod
    def new(cls, rows: int, device) -> SpecState:
        z = dict(dtype=torch.int64, device=device)
        return cls(torch.zeros(rows, **z), torch.zeros((), **z), torch.zeros((), **z))

    def tensors(self) -> list[torch.Tensor]:
        return [self.prev, self.drafted, self.accepted]


def distribution(z: torch.Tensor, sp: SamplingParams, bufs: DecodeBuffers, counts, prompt_mask):
    """Combined logits z [N, V] fp32 of a sampled round -> (penalized logits [N, V], warped probabilities [N, V]).
    ``counts`` [N, V]: the generated ids each row has seen at this position (penalties; None when off). Rows at
    temperature 0 (per-row values) are one-hot at the argmax (lowest index on ties), as
    :func:`ivl_fast.sampling.sample_ref` picks."""
    z = _penalize(z, sp, bufs, counts, prompt_mask)
    t = _per_position(sp.temperature, z, bufs)
    probs = warp_logits(
        z, t, _per_position(sp.top_k, z, bufs), _per_position(sp.top_p, z, bufs), _per_position(sp.min_p, z, bufs)
    ).softmax(-1)
    if isinstance(t, torch.Tensor):  # some rows may be greedy
        top = torch.nn.functional.one_hot(z.argmax(-1), z.shape[-1]).to(z.dtype)
        probs = torch.where(_col(t, z) > 0, probs, top)
    return z, probs


def race(probs: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A draw from each row of (unnormalised) ``probs`` [N, V] (the exponential race: argmax(p / E), E ~ Exp(1))."""
    e = torch.empty_like(probs).exponential_(1.0, generator=gen)
    return (probs / e.clamp_(min=torch.finfo(probs.dtype).tiny)).argmax(-1)


def accept(p: torch.Tensor, q: torch.Tensor, x: torch.Tensor, gen: torch.Generator):
    """Exact speculative sampling. p [B, k + 1, V] target, q [B, k, V] draft probabilities, x [B, k] the drafted
    ids -> (n [B] accepted drafts, the row's tokens [B, k + 1]: x_0 .. x_{n-1}, then the correction (or bonus)
    at index n; what follows n is meaningless). (Greedy rounds accept by argmax in :func:`speculative_round`.)"""
    b, k = x.shape
    px = p[:, :k].gather(-1, x[..., None])[..., 0]  # [B, k]
    qx = q.gather(-1, x[..., None])[..., 0]
    u = torch.rand((b, k), generator=gen, device=p.device)
    ok = u * qx < px  # u < p / q (q(x) > 0: x was drawn from q)
    n = ok.to(torch.int64).cumprod(1).sum(1)  # [B] leading accepts
    rows = torch.arange(b, device=p.device)
    p_n = p[rows, n]  # [B, V]
    q_n = torch.cat([q, torch.zeros_like(q[:, :1])], 1)[rows, n]  # q_k = 0: the bonus draws from p_k
    resid = (p_n - q_n).clamp(min=0)
    # p == q up to rounding leaves nothing: then rejection had probability ~0, and p itself is the right law
    resid = torch.where(resid.sum(-1, keepdim=True) > 0, resid, p_n)
    extra = race(resid, gen)
    tokens = torch.cat([x, torch.zeros_like(x[:, :1])], 1).scatter(1, n[:, None], extra[:, None])
    return n, tokens


def _combine(zm: torch.Tensor, zv: torch.Tensor | None, alpha: float, v: int) -> torch.Tensor:
    """The draft's or the base's logits [.., V_rows] with the value network's, over the ``v`` sampled ids."""
    return combine_logits(zm[..., :v], None if zv is None else zv[..., :v], alpha)


def _per_position(x, z: torch.Tensor, bufs: DecodeBuffers):
    """A scalar, or the buffers' [B] values repeated for each of z's rows (positions of a round, row-major)."""
    return x.repeat_interleave(z.shape[0] // bufs.rows) if isinstance(x, torch.Tensor) else x


def _penalize(z: torch.Tensor, sp: SamplingParams, bufs: DecodeBuffers, counts, prompt_mask) -> torch.Tensor:
    if not sp.penalties_on:
        return z
    return apply_penalties(
        z,
        prompt_mask,
        counts,
        _per_position(sp.repetition_penalty, z, bufs),
        _per_position(sp.presence_penalty, z, bufs),
        _per_position(sp.frequency_penalty, z, bufs),
    )


def speculative_round(
    models: ModelSet, draft, bufs: DecodeBuffers, cfg: SpecConfig, eos: torch.Tensor, kv_len: int, state: SpecState
) -> None:
    """One round for every row of ``bufs`` (see the module docstring); in place, no host sync. ``kv_len``: cache
    columns every model attends to (>= every row's position + k + 1)."""
    base, value, alpha, k = models.base, models.value, models.alpha, cfg.k
    sp = cfg.sampling
    use_value = value is not None and value in models.engines
    v = models.sampled_vocab
    greedy = sp.greedy
    gen = None if greedy else bufs.gen
    live = ~bufs.finished  # [B]
    engines = [base, draft] + ([value] if use_value else [])
    start = [e.context_lengths() for e in engines]  # [B] each: what every model has read (the draft: one less)
    pen = sp.penalties_on
    counts = bufs.output_counts.clone() if pen else None  # [B, V] the generated ids so far
    tok, xs, qs, zvs, bad = bufs.ids, [], [], [], torch.zeros_like(live)
    for j in range(k + 1):  # draft phase: the value network's logits at all k + 1 positions come from here
        zv = value.decode(tok, kv_len=kv_len) if use_value else None  # [B, V]
        zvs.append(zv)
        if j == k:
            break
        if j == 0:
            zd = draft.extend(torch.stack([state.prev, tok], 1), kv_len=kv_len)[:, -1]
        else:
            zd = draft.decode(tok, kv_len=kv_len)
        zq = _combine(zd, zv, alpha, v)
        bad |= ~torch.isfinite(zq).all(-1)
        if greedy:  # q is one-hot at the (penalized) argmax: only the argmax is needed
            x = _penalize(zq, sp, bufs, counts, bufs.prompt_mask).argmax(-1)
        else:
            _, q = distribution(zq, sp, bufs, counts, bufs.prompt_mask)
            x = race(q, gen)
            qs.append(q)
        if pen:
            counts = counts.scatter_add(1, x[:, None], torch.ones_like(x[:, None], dtype=counts.dtype))
        xs.append(x)
        tok = x
    x = torch.stack(xs, 1)  # [B, k]
    zb = base.extend(torch.cat([bufs.ids[:, None], x], 1), kv_len=kv_len)  # [B, k + 1, V]
    zp = _combine(zb, torch.stack(zvs, 1) if use_value else None, alpha, v)  # [B, k + 1, V]
    bad |= ~torch.isfinite(zp).all(-1).all(-1)
    flat_counts = prompt_mask = None
    if pen:  # the counts each position sees: the round's start + the drafts before it
        onehot = torch.zeros(x.shape[0], k + 1, v, dtype=bufs.output_counts.dtype, device=x.device)
        onehot[:, 1:].scatter_(2, x[..., None], 1)
        flat_counts = (bufs.output_counts[:, None] + onehot.cumsum(1)).reshape(-1, v)
        prompt_mask = bufs.prompt_mask.repeat_interleave(k + 1, 0)
    if greedy:  # accept x_j iff it is the target's argmax; the first mismatch (or the bonus) is the argmax
        zpen = _penalize(zp.reshape(-1, v), sp, bufs, flat_counts, prompt_mask).reshape(-1, k + 1, v)
        top = zpen.argmax(-1)  # [B, k + 1]
        n = (x == top[:, :k]).to(torch.int64).cumprod(1).sum(1)  # [B]
        tokens = torch.cat([x, top[:, k:]], 1).scatter(1, n[:, None], top.gather(1, n[:, None]))
    else:
        zpen, p = distribution(zp.reshape(-1, v), sp, bufs, flat_counts, prompt_mask)
        zpen = zpen.reshape(-1, k + 1, v)
        n, tokens = accept(p.reshape(-1, k + 1, v), torch.stack(qs, 1), x, gen)  # [B], [B, k + 1]
    kept = _emit(bufs, cfg, eos, live, n, tokens, zpen, bad, state)  # [B] tokens emitted
    for e, s in zip(engines, start, strict=True):  # each row's KV holds y and the drafts it kept
        e.rewind(s + kept)
    state.drafted += live.sum() * k
    state.accepted += torch.where(live, n, 0).sum()


def _emit(bufs: DecodeBuffers, cfg: SpecConfig, eos, live, n, tokens, zpen, bad, state: SpecState) -> torch.Tensor:
    """Write each live row's tokens 0..m (m: n, cut at its first EOS and at its budget) into its next output
    columns, with their log-probabilities; update penalties' counts, stop flags and the pending token.
    -> [B] tokens emitted per row (0 for finished rows)."""
    k = cfg.k
    j = torch.arange(k + 1, device=tokens.device)[None]  # [1, k + 1]
    is_eos = (tokens[..., None] == eos).any(-1) if eos.numel() else torch.zeros_like(tokens, dtype=torch.bool)
    eos_hit = is_eos & (j <= n[:, None])
    first_eos = torch.where(eos_hit.any(1), eos_hit.to(torch.int64).argmax(1), k + 1)  # [B]
    room = bufs.limit - bufs.steps - 1  # the last index the budget allows
    m = torch.minimum(torch.minimum(n, first_eos), room).clamp(min=0)  # [B]
    keep = (j <= m[:, None]) & live[:, None]  # [B, k + 1]
    cols = bufs.steps[:, None] + j
    bufs.out.scatter_(1, cols, torch.where(keep, tokens, bufs.pad))
    if cfg.return_logprobs:
        lp = zpen.log_softmax(-1).gather(-1, tokens[..., None])[..., 0]  # [B, k + 1]
        bufs.logprobs.scatter_(1, cols, torch.where(keep, lp, 0.0))
    if cfg.sampling.penalties_on:
        bufs.output_counts.scatter_add_(1, tokens, keep.to(bufs.output_counts.dtype))
    bufs.bad |= bad & live
    hit = live & ((first_eos <= m) | (bufs.steps + m + 1 >= bufs.limit))
    bufs.stop_step.copy_(torch.where(hit, bufs.steps + m, bufs.stop_step))
    bufs.finished |= hit
    bufs.steps += torch.where(live, m + 1, 0)
    last = tokens.gather(1, m[:, None])[:, 0]
    before = torch.where(m > 0, tokens.gather(1, (m - 1).clamp(min=0)[:, None])[:, 0], bufs.ids)  # token m - 1
    state.prev.copy_(torch.where(live, before, state.prev))
    bufs.ids.copy_(torch.where(live, last, bufs.ids))
    bufs.done.copy_((bufs.finished.all() | bufs.bad.any()).to(torch.int32).reshape(1))
    return torch.where(live, m + 1, 0)


__all__ = ["SpecConfig", "SpecState", "accept", "distribution", "race", "speculative_round"]
