"""The decode step as free functions (gpt-fast's ``decode_one_token``): what a graph captures.

``decode_logits`` runs the scheme's models for one token per row; ``sample`` turns both models' logits into the
next ids with one fused op; ``emit`` does the step's bookkeeping on device, in place (output column, EOS,
budgets, penalties' counts, NaN flags, RNG offset), so the same step runs eagerly or replayed as a graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..graphs import fork_join
from ..ops.combine_and_sample import penalized_logits, sample_rows
from ..sampling import SamplingParams, combine_logits, warp_logits
from .buffers import DecodeBuffers
from .model_set import ModelSet


@dataclass(frozen=True)
class StepConfig:
    """What a step's code depends on (a graph is captured per distinct value of :meth:`graph_key`).

    per_row_values: the warpers' values come from the buffers (graph runs: a new temperature needs no recapture)
    instead of Python scalars. continuous: rows come and go (continuous batching): finished rows stop advancing
    their KV position and output column, and each row's budget ends it on device. A generate() batch starts and
    ends together, so it skips that bookkeeping (its cache holds every row's prompt + max_new_tokens)."""

    sampling: SamplingParams
    return_logprobs: bool
    backend: str
    per_row_values: bool
    n_eos: int
    continuous: bool = False
    row_alpha: bool = False  # alpha per row from the buffers (per-request batches on the torch sampler)
    row_seeds: bool = False  # rows may bring their own seed (per-request batches): bufs.row_seed / bufs.seeded
    top_logprobs: int = 0  # record the K most likely tokens and their log-probabilities per row and step
    min_new_tokens: int = 0  # EOS ids cannot be drawn before a row has this many new tokens
    record_scores: bool = False  # keep each step's processed scores [B, V] (transformers' output_scores)
    record_logits: bool = False  # keep each step's combined logits [B, V] (transformers' output_logits)
    components: int = 0  # keep each step's top-K of the base, of the value's delta and of the combination

    def graph_key(self, mode: str, kv_len: int, alpha: float) -> tuple:
        sp = self.sampling
        sampling = ("greedy",) if sp.greedy else ("sample", sp.top_k_on, sp.top_p_on, sp.min_p_on)
        return (
            mode,
            kv_len,
            sampling,
            sp.penalties_on,
            self.return_logprobs,
            self.n_eos,
            alpha,
            self.backend,
            self.continuous,
            self.row_alpha,
            self.row_seeds,
            self.top_logprobs,
            self.min_new_tokens,
            self.record_scores,
            self.record_logits,
            self.components,
        )


def _kw(engine, kv_len: int | None, active: torch.Tensor | None) -> dict:
    """The decode keywords ``engine`` takes (capability attributes read directly: this runs every step)."""
    kw = {}
    if kv_len is not None and engine.supports_graphs:
        kw["kv_len"] = kv_len
    if active is not None and engine.supports_slots:
        kw["active"] = active
    return kw


def _with_terms(models: ModelSet, zv, run):
    """The value side's logits: z_value, or with logit terms the list [z_value, z_term_1, ...] (``run(engine)``
    gives a term's logits), which :func:`sample` unpacks."""
    if not models.terms:
        return zv
    return [zv, *(run(e) for e, _ in models.terms)]


def into_slots(z, rows: torch.Tensor, n: int):
    """Logits of admitted rows [k, V] (or None, or the value side's list with logit terms) -> [n, V] with them at
    ``rows`` [k] and zeros elsewhere (rows that do not emit)."""
    if z is None:
        return None
    if isinstance(z, list):
        return [into_slots(x, rows, n) for x in z]
    return z.new_zeros((n, z.shape[1])).index_copy_(0, rows, z)


def prefill_logits(models: ModelSet, prompt: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor | None = None):
    """(z_base, z_value) [n, V] each (None for a model the scheme does not use) of left-padded prompts [n, T];
    ``rows``: the cache slots they fill (None: the whole batch). With logit terms the value side is a list
    (see :func:`_with_terms`)."""
    kw = {} if rows is None else {"rows": rows}
    if models.probe:  # the probe reads the base's last hidden state
        zb, h = models.base.prefill(prompt, mask, hidden=True, **kw)
        return zb, models.value.logits(h)
    if models.cascade:  # sequential: the value network reads the base's distribution
        zb_all = models.base.prefill(prompt, mask, all_logits=True, **kw)  # [n, T, V]
        emb = models.value.soft_embed(models.cascade_input(zb_all), prompt if models.scheme == "cascade+" else None)
        return zb_all[:, -1], models.value.prefill(None, mask, inputs_embeds=emb, **kw)
    zb = models.base.prefill(prompt, mask, **kw) if models.base in models.engines else None
    zv = models.value.prefill(prompt, mask, **kw) if models.value in models.engines else None
    return zb, _with_terms(models, zv, lambda e: e.prefill(prompt, mask, **kw))


def decode_logits(models: ModelSet, ids: torch.Tensor, kv_len: int | None = None, side=None, active=None):
    """(z_base, z_value) [B, V] of the next position after feeding ``ids`` [B]. ``kv_len``: cache columns to
    attend to; ``side``: a CUDA stream for the value model (residual scheme); ``active`` [B] bool: rows whose
    context advances (finished rows and free slots stay where they are)."""
    base, value = models.base, models.value
    if models.probe:  # sequential: the probe reads the base's final hidden state
        zb, h = base.decode(ids, hidden=True, **_kw(base, kv_len, active))
        return zb, value.logits(h)
    if models.cascade:
        zb = base.decode(ids, **_kw(base, kv_len, active))
        emb = value.soft_embed(models.cascade_input(zb), ids if models.scheme == "cascade+" else None)
        return zb, value.decode(None, inputs_embeds=emb, **_kw(value, kv_len, active))

    def terms(zv):  # the logit terms run where the value network runs (its stream)
        return _with_terms(models, zv, lambda e: e.decode(ids, **_kw(e, kv_len, active)))

    if models.scheme == "base":
        return fork_join(lambda: base.decode(ids, **_kw(base, kv_len, active)), lambda: terms(None), side)
    if models.scheme == "value_only":
        return None, terms(value.decode(ids, **_kw(value, kv_len, active)))
    return fork_join(
        lambda: base.decode(ids, **_kw(base, kv_len, active)),
        lambda: terms(value.decode(ids, **_kw(value, kv_len, active))),
        side,
    )


def _early_eos(bufs: DecodeBuffers, cfg: StepConfig, like: torch.Tensor) -> torch.Tensor:
    """[B, V] bool: the EOS ids of the rows with fewer than ``cfg.min_new_tokens`` new tokens."""
    eos = torch.zeros(like.shape[1], dtype=torch.bool, device=like.device).index_fill_(0, bufs.eos[cfg.n_eos], True)
    return (bufs.steps < cfg.min_new_tokens)[:, None] & eos[None, :]


def _ban_early_eos(bufs: DecodeBuffers, cfg: StepConfig, zb, zv):
    """min_new_tokens: the early rows' EOS logits lowered on one side of the combination so that no EOS is drawn
    -> (zb, zv): the base's side (already in the sampled vocabulary) or, without a base, the value's; to a finite
    floor (-1e30, or a quarter of the dtype's lowest), not -inf, which the non-finite check would report: any
    finite value of the other side added, exp() of it is 0."""
    side = zb if zb is not None else zv
    side = side.masked_fill(_early_eos(bufs, cfg, side), max(torch.finfo(side.dtype).min / 4, -1e30))
    return (side, zv) if zb is not None else (None, side)


def _records(bufs: DecodeBuffers, cfg: StepConfig, zb, zv, rows, alpha, terms) -> dict:
    """The step's transformers-style outputs, computed apart from the fused sampler (``zb`` in the sampled
    vocabulary; ``terms``: (logits, weights) or None): ``raw_logits``, the combined logits (before any processor),
    and ``scores``, what transformers' processors and (when sampling) warpers make of them: penalties, EOS at -inf
    before min_new_tokens, then temperature, top-k, top-p, min-p."""
    out = {}
    if cfg.record_logits:
        out["raw_logits"] = combine_logits(zb, zv, alpha, list(zip(*terms, strict=True)) if terms else ())
    if cfg.record_scores:
        z = penalized_logits(zb, zv, rows, alpha=alpha, terms=terms)
        if cfg.min_new_tokens and cfg.n_eos:
            z = z.masked_fill(_early_eos(bufs, cfg, z), float("-inf"))
        if not cfg.sampling.greedy:
            p = rows.params
            z = warp_logits(z, p.temperature, p.top_k, p.top_p, p.min_p)
        out["scores"] = z
    return out


def _components(zb, zv, alpha, terms, k: int) -> dict:
    """What the value network changed, per row: the top-``k`` of the base alone (log-probabilities), of the value
    network's delta alpha * z_value (logits) and of the combination (log-probabilities, logit terms included),
    before penalties and warpers (``zb`` in the sampled vocabulary; ``terms``: (logits, weights) or None) ->
    {"comp_ids": [B, 3, k] int64, "comp_vals": [B, 3, k] fp32}."""
    listed = list(zip(*terms, strict=True)) if terms else ()
    sides = (zb.float().log_softmax(-1), alpha * zv.float(), combine_logits(zb, zv, alpha, listed).log_softmax(-1))
    tops = [x.topk(k, dim=-1) for x in sides]
    return {
        "comp_ids": torch.stack([t.indices for t in tops], 1),
        "comp_vals": torch.stack([t.values for t in tops], 1),
    }


def sample(models: ModelSet, bufs: DecodeBuffers, cfg: StepConfig, zb, zv, pushed: bool = False):
    """-> (ids [B], logprobs [B] or None, non-finite flags [B], top or None, records or None) from one fused
    sampling call over the buffers' sampling view; top: (ids [B, K], logprobs [B, K]) of the K =
    ``cfg.top_logprobs`` most likely tokens of the distribution the logprobs are taken from (penalized, before the
    warpers), computed apart from the fused sampler; records: :func:`_records` when the step keeps them.
    ``pushed``: zb is the base's side already in the value vocabulary (across vocabularies, where the base reads a
    token boundary: :mod:`.boundary`), so the map is not applied again."""
    # Padded vocabularies (models.real_vocab; one tokenizer, e.g. a 152,064-row base and a 151,936-row value):
    # every model's logits [B, V_rows] become views [B, real_vocab] (row stride V_rows, no copy), so the op
    # combines, samples and normalises over the real ids only and a padding id is never drawn. Chosen over masking
    # the padding rows to -inf, which would need a [B, V_rows] copy per step (the models' outputs are theirs) and
    # [B, V_rows] penalty buffers; the fused kernel reads rows through their stride. Here, not in decode_logits,
    # because the two-stream graphs and admissions reach the sampler without it. No-op when the rows agree.
    zb, zv = models.trim(zb), models.trim(zv)
    terms = {}
    if isinstance(zv, list):  # logit terms: [z_value, z_term_1, ...]
        zv, zts = zv[0], zv[1:]
        terms = dict(terms=zts, term_weights=models.term_weights)
    rows = bufs.sampling_view(cfg.sampling, cfg.per_row_values, cfg.row_seeds)
    alpha = bufs.alpha if cfg.row_alpha else models.alpha
    vocab_map = None if pushed else models.vocab_map
    records = None
    ban = cfg.min_new_tokens and cfg.n_eos
    if cfg.record_scores or cfg.record_logits or cfg.components or ban:
        if vocab_map is not None and zb is not None:  # pushed once here: every use below reads the sampled vocabulary
            zb, vocab_map = vocab_map.apply(zb), None
        a = alpha[:, None] if cfg.row_alpha else alpha
        pairs = (terms["terms"], terms["term_weights"]) if terms else None
        records = {}
        if cfg.record_scores or cfg.record_logits:  # before the EOS ban: output_logits are the models' own
            records.update(_records(bufs, cfg, zb, zv, rows, a, pairs))
        if cfg.components:
            records.update(_components(zb, zv, a, pairs, cfg.components))
        if ban:
            zb, zv = _ban_early_eos(bufs, cfg, zb, zv)
    ids, lp, bad = sample_rows(
        zb,
        zv,
        rows,
        vocab_map=vocab_map,
        alpha=alpha,
        return_logprobs=cfg.return_logprobs,
        backend=cfg.backend,
        workspace=bufs.work,
        **terms,
    )
    bufs.offset_t += 1
    top = None
    if cfg.top_logprobs:
        z = penalized_logits(
            zb,
            zv,
            rows,
            vocab_map=vocab_map,
            alpha=alpha[:, None] if cfg.row_alpha else alpha,
            terms=(terms["terms"], terms["term_weights"]) if terms else None,
        )
        top_lp, top_ids = z.log_softmax(-1).topk(cfg.top_logprobs, dim=-1)
        top = (top_ids, top_lp)
    return ids, lp, bad, top, records


def emit(
    bufs: DecodeBuffers,
    cfg: StepConfig,
    eos: torch.Tensor,
    ids,
    lp,
    bad,
    top=None,
    records=None,
    live: torch.Tensor | None = None,
):
    """The step's bookkeeping, on device and in place. ``live`` [B] bool: the rows this emission advances (an
    admission emits for its new rows only; default: every unfinished row). Other rows write pad into their next
    column, which holds pad already (finished rows: the column after their last token, or the spare last one).
    ``top``: (ids [B, K], logprobs [B, K]) written to every row's column (read only for the live rows);
    ``records``: {buffer name: [B, V]} written likewise."""
    track = cfg.continuous or live is not None  # per-row budgets and columns (see StepConfig.continuous)
    live = ~bufs.finished if live is None else live & ~bufs.finished
    bufs.bad |= bad & live
    ids = torch.where(live, ids, bufs.pad)
    col = bufs.steps[:, None]
    bufs.out.scatter_(1, col, ids[:, None])
    if lp is not None:
        bufs.logprobs.scatter_(1, col, torch.where(live, lp, 0.0)[:, None])
    if top is not None:
        k = top[0].shape[1]
        rows = torch.arange(ids.shape[0], device=ids.device)
        bufs.top_ids[rows, bufs.steps, :k] = top[0]
        bufs.top_logprobs[rows, bufs.steps, :k] = top[1]
    for name, z in (records or {}).items():
        getattr(bufs, name)[torch.arange(ids.shape[0], device=ids.device), bufs.steps, ..., : z.shape[-1]] = z
    if cfg.sampling.penalties_on:
        bufs.output_counts.scatter_add_(1, ids[:, None], live.to(torch.int32)[:, None])
    hit = live & (ids[:, None] == eos[None, :]).any(1) if eos.numel() else None
    if track:
        spent = live & (bufs.steps + 1 >= bufs.limit)  # the row's budget is spent
        hit = spent if hit is None else hit | spent
    if hit is not None:
        bufs.stop_step.copy_(torch.where(hit, bufs.steps, bufs.stop_step))
        bufs.finished |= hit
    if track:
        bufs.steps += live.to(torch.int64)
        bufs.ids.copy_(torch.where(live, ids, bufs.ids))
    else:  # every row advances a column together (finished rows write pad)
        bufs.steps += 1
        bufs.ids.copy_(ids)
    if cfg.per_row_values:  # the graph runners' early-exit flag (eager runs check on the host)
        bufs.done.copy_((bufs.finished.all() | bufs.bad.any()).to(torch.int32).reshape(1))


def decode_step(models: ModelSet, bufs: DecodeBuffers, cfg: StepConfig, eos, kv_len: int | None, side=None) -> None:
    """One whole decode step: feed every row's pending token, sample, book-keep (the body a graph captures)."""
    zb, zv = decode_logits(models, bufs.ids, kv_len, side, active=~bufs.finished if cfg.continuous else None)
    emit(bufs, cfg, eos, *sample(models, bufs, cfg, zb, zv))
