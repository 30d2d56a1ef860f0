"""The torch reference for everything between the two models' logits and the next token ids.

This module is the spec the fused kernel must match. First the penalties (:func:`apply_penalties`), on the
combined fp32 logits, in vLLM's order:

- repetition_penalty (transformers' ``RepetitionPenaltyLogitsProcessor``): every token that occurs in the prompt
  or among the generated ids (a set: once is enough) gets ``z * p if z < 0 else z / p``; 1.0 = off, must be > 0.
- frequency_penalty, presence_penalty (OpenAI / vLLM, over the generated ids only, never the prompt):
  ``z[v] -= frequency_penalty * count[v] + presence_penalty * (count[v] > 0)``; 0.0 = off, each in [-2, 2].

They apply whether decoding samples or is greedy (as transformers' processors do), and the returned
log-probabilities are those of the penalized distribution (before the warpers). Then ``transformers``' sampling
warpers exactly, in their order: temperature -> top_k -> top_p -> min_p, with ``min_tokens_to_keep=1``:

- temperature: ``z / t``; ``t == 0`` (or ``do_sample=False``) means greedy.
- top_k: keep every token whose logit is >= the k-th largest (ties at the k-th value are all kept); 0 = off.
- top_p: sort ascending (stably: among tied logits the lower index comes first), remove tokens whose
  cumulative probability is <= 1 - p, always keep the top token; 1.0 = off.
- min_p: remove tokens whose probability is < min_p * (top probability); 0 = off.
- greedy: argmax with the lowest index on ties.

Every parameter may be a Python scalar or a tensor of shape [B] (one value per row). Sampling draws with the
exponential-race trick (``argmax(p / E)``, E ~ Exp(1)), which samples exactly from ``p`` and needs no host sync.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from .checks import is_number
from .philox import row_uniforms

Param = float | int | torch.Tensor


@dataclass(frozen=True)
class SamplingParams:
    """Validated sampling settings (scalars or [B] tensors)."""

    do_sample: bool = False
    temperature: Param = 1.0
    top_k: Param = 0
    top_p: Param = 1.0
    min_p: Param = 0.0
    repetition_penalty: Param = 1.0
    presence_penalty: Param = 0.0
    frequency_penalty: Param = 0.0

    def __post_init__(self):
        validate_sampling(
            self.temperature,
            self.top_k,
            self.top_p,
            self.min_p,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
        )
        if not isinstance(self.top_k, torch.Tensor) and self.top_k > TOP_K_MAX:  # as many as any vocabulary: no
            object.__setattr__(self, "top_k", TOP_K_MAX)  # change, and no size of it overflows an int64 buffer
        t = self.temperature  # validation already read tensors back, so this adds no sync
        greedy = not self.do_sample or (bool((t == 0).all()) if isinstance(t, torch.Tensor) else t == 0)
        object.__setattr__(self, "_greedy", greedy)

    @classmethod
    def trusted(
        cls,
        do_sample,
        temperature,
        top_k,
        top_p,
        min_p,
        *,
        repetition_penalty: Param = 1.0,
        presence_penalty: Param = 0.0,
        frequency_penalty: Param = 0.0,
    ) -> SamplingParams:
        """Already validated settings (skips validation, which syncs with the device for tensor parameters)."""
        obj = object.__new__(cls)
        for k, v in zip(
            ("do_sample", "temperature", "top_k", "top_p", "min_p")
            + ("repetition_penalty", "presence_penalty", "frequency_penalty"),
            (do_sample, temperature, top_k, top_p, min_p, repetition_penalty, presence_penalty, frequency_penalty),
            strict=True,
        ):
            object.__setattr__(obj, k, v)
        t = temperature  # no device read: per-row tensors count as sampling (their t == 0 rows stay greedy)
        object.__setattr__(obj, "_greedy", not do_sample or (not isinstance(t, torch.Tensor) and t == 0))
        return obj

    @property
    def top_k_on(self) -> bool:
        """top_k filters (tensors: always applied, rows with 0 unfiltered)."""
        return isinstance(self.top_k, torch.Tensor) or self.top_k > 0

    @property
    def top_p_on(self) -> bool:
        return isinstance(self.top_p, torch.Tensor) or self.top_p < 1

    @property
    def min_p_on(self) -> bool:
        return isinstance(self.min_p, torch.Tensor) or self.min_p > 0

    @property
    def penalties_on(self) -> bool:
        """Some penalty applies (tensors: always applied, rows at 1.0 / 0.0 left unchanged); never syncs."""
        on = self.__dict__.get("_penalties_on")  # computed once: the decode step asks every step
        if on is None:
            on = self._penalties()
            object.__setattr__(self, "_penalties_on", on)
        return on

    def _penalties(self) -> bool:
        rep, pres, freq = self.repetition_penalty, self.presence_penalty, self.frequency_penalty
        if any(isinstance(x, torch.Tensor) for x in (rep, pres, freq)):
            return True
        return rep != 1 or pres != 0 or freq != 0

    @property
    def greedy(self) -> bool:
        """True when no row samples (so the RNG is never touched); computed once, never syncs."""
        return self._greedy


def _check(name: str, value: Param, ok, expected: str) -> None:
    vals = value.detach().flatten().tolist() if isinstance(value, torch.Tensor) else [value]
    for v in vals:
        if not is_number(v) or v != v or not ok(v):
            raise ValueError(f"{name} must be {expected}, got {value!r}")


FLOAT32_MAX = float(torch.finfo(torch.float32).max)
TOP_K_MAX = 2**31 - 1  # a top_k above any vocabulary keeps every token (transformers takes min(top_k, V))


def _f32(v: float) -> float:
    """``v`` as float32 holds it (inf past its range, 0 below its smallest subnormal)."""
    return float(torch.tensor(float(v), dtype=torch.float64).to(torch.float32))


def validate_sampling(
    temperature: Param,
    top_k: Param,
    top_p: Param,
    min_p: Param,
    *,
    repetition_penalty: Param = 1.0,
    presence_penalty: Param = 0.0,
    frequency_penalty: Param = 0.0,
) -> None:
    """Raise ValueError naming the first invalid argument."""
    # the values live in float32 on the device: one that float32 turns into inf (1e308) or 0 (1e-50) is refused
    # here, before it reaches a batch shared with other requests
    _check(
        "temperature",
        temperature,
        lambda v: v >= 0 and math.isfinite(_f32(v)) and (v == 0 or _f32(v) > 0),
        "a finite number >= 0 that float32 holds",
    )
    integer = lambda v: isinstance(v, int) or float(v).is_integer()  # noqa: E731  (float(10**400) overflows)
    _check("top_k", top_k, lambda v: v >= 0 and integer(v), "an integer >= 0 (0 disables it)")
    _check("top_p", top_p, lambda v: 0 < v <= 1 and _f32(v) > 0, "in (0, 1] (1 disables it)")
    _check("min_p", min_p, lambda v: 0 <= v <= 1, "in [0, 1] (0 disables it)")
    _check(
        "repetition_penalty",
        repetition_penalty,
        lambda v: 0 < _f32(v) < float("inf"),
        "a finite number > 0 that float32 holds (1 disables it)",
    )
    # OpenAI's range; the bounds also refuse +-inf (NaN is refused by _check)
    _check("presence_penalty", presence_penalty, lambda v: -2 <= v <= 2, "in [-2, 2] (0 disables it)")
    _check("frequency_penalty", frequency_penalty, lambda v: -2 <= v <= 2, "in [-2, 2] (0 disables it)")


def _col(p: Param, like: torch.Tensor, dtype=None) -> torch.Tensor:
    """Scalar or [B] -> [B, 1] tensor on like's device (torch.full for scalars: no host-to-device copy)."""
    dtype = dtype or like.dtype
    if isinstance(p, torch.Tensor):
        return p.to(device=like.device, dtype=dtype).reshape(-1, 1)
    return torch.full((like.shape[0], 1), p, dtype=dtype, device=like.device)


def combine_logits(
    base_logits: torch.Tensor | None, value_logits: torch.Tensor | None, alpha: Param = 1.0, terms=()
) -> torch.Tensor:
    """The IVL combination, the one place it is computed (decoding's sampler, scoring, speculative rounds and the
    vLLM model call it): z = z_base + alpha * z_value + sum_i w_i * z_i in fp32, over [..., V] logits of one
    vocabulary. Either side may be None: the other alone, as it is (alpha not applied: scheme base / value_only).
    ``alpha``: a float or a tensor broadcasting against the logits ([B, 1]: one per row); ``terms``: (logits,
    weight) pairs of more same-vocabulary models (logit arithmetic: proxy tuning, DExperts)."""
    if base_logits is None and value_logits is None:
        raise ValueError("combine_logits needs at least one of base_logits, value_logits")
    if value_logits is None:
        z = base_logits.float()
    elif base_logits is None:
        z = value_logits.float()
    elif base_logits.shape != value_logits.shape:
        raise ValueError(f"base logits {tuple(base_logits.shape)} and value logits {tuple(value_logits.shape)} differ")
    else:
        z = base_logits.float() + alpha * value_logits.float()
    for t, w in terms:
        z = z + w * t.float()
    return z


def apply_penalties(
    logits: torch.Tensor,
    prompt_mask: torch.Tensor,
    output_counts: torch.Tensor,
    repetition_penalty: Param = 1.0,
    presence_penalty: Param = 0.0,
    frequency_penalty: Param = 0.0,
) -> torch.Tensor:
    """Penalized logits [B, V]: repetition first, then frequency and presence (vLLM's order); see the module doc.

    logits [B, V] fp32 (the combined logits); prompt_mask [B, V] bool: the token occurs in the prompt (padding
    excluded); output_counts [B, V] integer: how often each token was generated so far. The penalties are scalars
    or [B] tensors; a row at 1.0 / 0.0 / 0.0 is returned unchanged, bit for bit. No host sync (graph-safe).
    """
    z = logits
    counts = output_counts.to(z.dtype)  # [B, V]; exact up to 2^24 generated copies of one token
    present = (output_counts > 0).to(z.dtype)  # [B, V] 0/1
    # repetition: a set over prompt + generated ids; z * p pushes negatives down, z / p pulls positives down
    rep = _col(repetition_penalty, z)  # [B, 1]
    seen = prompt_mask | (output_counts > 0)
    z = torch.where(seen, torch.where(z < 0, z * rep, z / rep), z)
    # two separate subtractions, as vLLM does them (so the rounding is the same)
    z = z - _col(frequency_penalty, z) * counts
    z = z - _col(presence_penalty, z) * present
    return z


def warp_logits(
    logits: torch.Tensor, temperature: Param = 1.0, top_k: Param = 0, top_p: Param = 1.0, min_p: Param = 0.0
) -> torch.Tensor:
    """logits [B, V] -> warped logits [B, V] (removed tokens = -inf), transformers' order and rules.

    Rows with temperature 0 are returned unscaled (they are decoded greedily by :func:`sample_ref`).
    """
    z = logits
    b, v = z.shape
    neg_inf = torch.full((), float("-inf"), dtype=z.dtype, device=z.device)
    t = _col(temperature, z)
    z = torch.where(t > 0, z / torch.where(t > 0, t, torch.ones_like(t)), z)

    k = _col(top_k, z, torch.int64)
    if isinstance(top_k, torch.Tensor) or top_k > 0:  # tensors: always, masked per row (no host sync)
        kk = k.clamp(min=1, max=v)  # max(top_k, min_tokens_to_keep), then min(., V)
        kth = torch.sort(z, dim=-1, descending=True).values.gather(1, kk - 1)  # [B, 1]
        z = torch.where((k > 0) & (z < kth), neg_inf, z)

    if isinstance(top_p, torch.Tensor) or top_p < 1:
        # transformers compares with (1 - top_p) computed in double, then rounded to the logits' dtype
        p = _col(top_p, z, torch.float64)
        cut = (1 - p).to(z.dtype)
        # stable: among tied logits the lower index is removed first (transformers' order on CUDA, where
        # torch.sort is a stable radix sort; on CPU its order of ties is implementation-defined)
        sorted_z, sorted_idx = torch.sort(z, dim=-1, descending=False, stable=True)
        cum = sorted_z.softmax(-1).cumsum(-1)
        remove_sorted = cum <= cut
        remove_sorted[:, -1] = False  # min_tokens_to_keep = 1
        remove = remove_sorted.scatter(1, sorted_idx, remove_sorted)
        z = torch.where((p < 1) & remove, neg_inf, z)

    mp = _col(min_p, z)
    if isinstance(min_p, torch.Tensor) or min_p > 0:
        probs = z.softmax(-1)
        remove = probs < mp * probs.amax(-1, keepdim=True)
        remove.scatter_(1, probs.argmax(-1, keepdim=True), False)  # min_tokens_to_keep = 1
        z = torch.where(remove, neg_inf, z)
    return z


def sample_ref(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    row_seeds: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """logits [B, V] (fp32) -> next ids [B] int64. Greedy rows: argmax, lowest index on ties.

    row_seeds: None, or (seed [B] int64, step [B] int64, seeded [B] bool): the seeded rows race with
    E = -log(u), u = Philox(seed; column, 0, step) (:func:`ivl_fast.philox.row_uniforms`, what the fused kernel
    draws), so their ids do not depend on the rest of the batch; the others draw from ``generator``."""
    greedy_ids = logits.argmax(-1)
    if params.greedy:
        return greedy_ids
    warped = warp_logits(logits, params.temperature, params.top_k, params.top_p, params.min_p)
    probs = warped.softmax(-1)
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    if row_seeds is not None:
        race = _seeded_race(race, *row_seeds)
    sampled = (probs / race.clamp_(min=torch.finfo(probs.dtype).tiny)).argmax(-1)
    t = _col(params.temperature, logits)[:, 0]
    return torch.where(t > 0, sampled, greedy_ids)


def _seeded_race(race: torch.Tensor, seed: torch.Tensor, step: torch.Tensor, seeded: torch.Tensor) -> torch.Tensor:
    """race [B, V] with the seeded rows' exponentials replaced by their counter-based ones."""
    if race.device.type == "cpu" and not is_in_torch_dispatch_mode():
        # eager on CPU: only the seeded rows pay for Philox (a host read, fine there; never under the graph
        # emulator, whose recording is a dispatch mode)
        rows = seeded.nonzero().flatten()
        if rows.numel():
            u = row_uniforms(seed[rows], step[rows], race.shape[1]).clamp_(min=2.3283064e-10)
            race = race.index_copy(0, rows, -torch.log(u).to(race.dtype))
        return race
    u = row_uniforms(seed, step, race.shape[1]).clamp_(min=2.3283064e-10)  # graph-safe: every row, then select
    return torch.where(seeded[:, None], -torch.log(u).to(race.dtype), race)


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Log-probability of ``ids`` [B] under the raw combined distribution softmax(logits) (before warping)."""
    return logits.log_softmax(-1).gather(1, ids[:, None])[:, 0]


def nonfinite_rows(logits: torch.Tensor) -> torch.Tensor:
    """[B] bool: rows holding NaN or +-inf (device-side; the decoder checks it at its stop check)."""
    return ~torch.isfinite(logits).all(-1)
