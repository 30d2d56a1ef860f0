"""combine_and_sample: the two models' logits -> next token ids (+ logprobs), one fused kernel on GPU.

``z = map(base_logits) + alpha * value_logits`` (map = the sparse base->value vocabulary map, identity when
the vocabularies are equal), then the penalties (repetition, then frequency and presence: vLLM's order, on the
fp32 z), then temperature -> top_k -> top_p -> min_p -> sample (or greedy argmax, which sees the penalties too)
with exactly the semantics of :mod:`ivl_fast.sampling` (transformers' warpers). Output vocabulary: the value
model's (V_out).

Penalties need ``prompt_mask`` [B, V_out] bool (the token occurs in the prompt) and ``output_counts``
[B, V_out] int32 (how often it was generated so far); the caller keeps both on device and updates them after
each step. Any penalty on (a tensor counts as on) without them is refused.

Returns ``(ids [B] int64, logprobs [B] fp32 or None, bad [B] bool)``; ``bad`` marks rows whose combined
logits held NaN/inf (a device tensor: the decoder checks it at its stop check, no host sync here). Logprobs are
those of the penalized combined distribution before the warpers (temperature and filters).

Randomness: the Triton kernel draws from Philox(seed; column, row, offset) with ``seed`` and ``offset`` int64
device tensors, so a captured CUDA graph draws fresh numbers when ``offset`` is advanced on device; the same
seed and offset give the same ids. The torch path (CPU) draws from a ``torch.Generator`` instead. Rows with their
own seed (``row_seed`` / ``row_step`` / ``seeded``) draw from Philox(row seed; column, 0, row step) on both paths,
bit for bit the same uniforms (:mod:`ivl_fast.philox`).
"""

from __future__ import annotations

import math

import torch

from ..sampling import SamplingParams, apply_penalties, combine_logits, nonfinite_rows, sample_ref, token_logprobs
from ._backend import pick_backend


def _as_row_tensor(name: str, v, b: int, dtype, device) -> torch.Tensor:
    """Scalar or [B] -> contiguous [B] tensor on device; scalars go through torch.full (no blocking copy)."""
    if not isinstance(v, torch.Tensor):
        return torch.full((b,), v, dtype=dtype, device=device)
    if v.dim() == 0:
        return v.to(device=device, dtype=dtype).expand(b).contiguous()
    if v.shape != (b,):
        raise ValueError(f"{name} must be a scalar or a [B={b}] tensor, got shape {tuple(v.shape)}")
    return v.to(device=device, dtype=dtype).contiguous()


def _check_logits(name: str, t: torch.Tensor | None) -> None:
    if t is None:
        return
    if t.dim() != 2:
        raise ValueError(f"{name} must be [B, V], got shape {tuple(t.shape)}")
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{name} must be float32/float16/bfloat16, got {t.dtype}")


def _check_penalty_inputs(prompt_mask, output_counts, b: int, v_out: int, device, on: bool) -> None:
    """prompt_mask [B, V_out] bool and output_counts [B, V_out] int32: required when a penalty is on, and checked
    (device, dtype, shape: metadata only, no sync) whenever given."""
    for name, t, dtype in (("prompt_mask", prompt_mask, torch.bool), ("output_counts", output_counts, torch.int32)):
        if t is None:
            if on:
                raise ValueError(
                    f"{name} ([B={b}, V={v_out}] {dtype}) is required when repetition_penalty, presence_penalty or "
                    f"frequency_penalty is on, got None"
                )
            continue
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a [B={b}, V={v_out}] {dtype} tensor, got {type(t).__name__}")
        if tuple(t.shape) != (b, v_out):
            raise ValueError(f"{name} must be [B={b}, V={v_out}] (the output vocabulary), got shape {tuple(t.shape)}")
        if t.dtype != dtype:
            raise ValueError(f"{name} must be {dtype}, got {t.dtype}")
        if t.device != device:
            raise ValueError(f"{name} must be on {device} (the logits' device), got {t.device}")


def add_terms(z: torch.Tensor, terms) -> torch.Tensor:
    """z [B, V] fp32 + sum_i w_i * z_i for ``terms`` = (list of [B, V] logits, weights: floats or a [M] tensor)."""
    if terms is None:
        return z
    for i, t in enumerate(terms[0]):
        z = z + terms[1][i] * t.float()
    return z


def _check_terms(terms, term_weights, b: int, v_out: int, device):
    """``terms`` (a list of [B, V_out] logits) with ``term_weights`` (floats or a [M] fp32 tensor on device) ->
    (list, weights) or None; ValueError naming what does not fit (metadata only, no sync)."""
    if terms is None and term_weights is None:
        return None
    if terms is None or term_weights is None:
        raise ValueError("terms and term_weights go together: a list of [B, V] logits and one weight each")
    terms = list(terms)
    m = len(term_weights) if not isinstance(term_weights, torch.Tensor) else term_weights.shape[0]
    if not terms or m != len(terms):
        raise ValueError(f"term_weights has {m} weight(s) for {len(terms)} term(s): one weight per term, at least one")
    for i, t in enumerate(terms):
        _check_logits(f"terms[{i}]", t)
        if tuple(t.shape) != (b, v_out) or t.device != device:
            raise ValueError(f"terms[{i}] must be [B={b}, V={v_out}] on {device}, got {tuple(t.shape)} on {t.device}")
    if isinstance(term_weights, torch.Tensor):
        if term_weights.dim() != 1 or term_weights.dtype != torch.float32 or term_weights.device != device:
            raise ValueError(f"term_weights must be a [M] float32 tensor on {device}")
    elif not all(isinstance(w, int | float) and not isinstance(w, bool) and math.isfinite(w) for w in term_weights):
        raise ValueError(f"term_weights must be finite numbers, got {term_weights!r}")
    return terms, term_weights


def _check_row_seeds(row_seed, row_step, seeded, b: int, device):
    """All three [B] tensors (int64, int64, bool) on ``device``, or none -> the tuple or None (metadata only)."""
    given = [t is not None for t in (row_seed, row_step, seeded)]
    if not any(given):
        return None
    if not all(given):
        raise ValueError("row_seed, row_step and seeded go together: pass all three [B] tensors or none")
    for name, t, dtype in (("row_seed", row_seed, torch.int64), ("row_step", row_step, torch.int64)) + (
        ("seeded", seeded, torch.bool),
    ):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (b,) or t.dtype != dtype or t.device != device:
            got = f"{tuple(t.shape)} {t.dtype} on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a [B={b}] {dtype} tensor on {device}, got {got}")
    return row_seed, row_step, seeded


def _one_penalty(name: str, arg, from_params, off):
    """The penalty the reference applies: the argument, else the one in ``params``; both set (and not the very same
    object) is ambiguous and refused."""
    arg_on = isinstance(arg, torch.Tensor) or arg != off
    params_on = isinstance(from_params, torch.Tensor) or from_params != off
    if arg_on and params_on and arg is not from_params:
        raise ValueError(f"{name} given both in params ({from_params!r}) and as an argument ({arg!r})")
    return arg if arg_on else from_params


def _all_off(rep, pres, freq) -> bool:
    """No penalty (scalars at their off values; a tensor counts as on)."""
    if isinstance(rep, torch.Tensor) or isinstance(pres, torch.Tensor) or isinstance(freq, torch.Tensor):
        return False
    return rep == 1 and pres == 0 and freq == 0


def combine_and_sample_ref(
    base_logits,
    value_logits,
    *,
    vocab_map=None,
    alpha=1.0,
    params: SamplingParams,
    generator=None,
    return_logprobs=False,
    repetition_penalty=1.0,
    presence_penalty=0.0,
    frequency_penalty=0.0,
    prompt_mask=None,
    output_counts=None,
    row_seeds=None,
    terms=None,
):
    """The torch reference: sparse map, add (+ the logit terms ``terms``: (list of [B, V_out], weights)), penalties,
    warp (sort-based), sample.

    The penalties may come as arguments or in ``params`` (not both). Logprobs are those of the penalized combined
    distribution before the warpers; ``bad`` flags the combined logits (before the penalties) holding NaN/inf.
    """
    zb = vocab_map.apply(base_logits) if (vocab_map is not None and base_logits is not None) else base_logits
    z = add_terms(combine_logits(zb, value_logits, alpha), terms)  # [B, V_out] fp32
    bad = nonfinite_rows(z)
    plain = prompt_mask is None and output_counts is None and not params.penalties_on
    if not (plain and _all_off(repetition_penalty, presence_penalty, frequency_penalty)):  # (the decode step's case)
        rep = _one_penalty("repetition_penalty", repetition_penalty, params.repetition_penalty, 1.0)
        pres = _one_penalty("presence_penalty", presence_penalty, params.presence_penalty, 0.0)
        freq = _one_penalty("frequency_penalty", frequency_penalty, params.frequency_penalty, 0.0)
        on = not _all_off(rep, pres, freq)
        _check_penalty_inputs(prompt_mask, output_counts, z.shape[0], z.shape[1], z.device, on)
        if on:
            z = apply_penalties(z, prompt_mask, output_counts, rep, pres, freq)
    ids = sample_ref(z, params, generator, row_seeds)
    lp = token_logprobs(z, ids) if return_logprobs else None
    return ids, lp, bad


def penalized_logits(
    base_logits,
    value_logits,
    *,
    vocab_map=None,
    alpha=1.0,
    repetition_penalty=1.0,
    presence_penalty=0.0,
    frequency_penalty=0.0,
    prompt_mask=None,
    output_counts=None,
    terms=None,
) -> torch.Tensor:
    """[B, V_out] fp32: the distribution the sampler's logprobs come from (mapped, combined, penalized; before the
    warpers). For the top alternatives of a step (a server's ``top_logprobs``), computed apart from the fused
    kernel, which never materialises it outside its workspace. ``alpha``: a float or [B, 1]."""
    zb = vocab_map.apply(base_logits) if (vocab_map is not None and base_logits is not None) else base_logits
    z = add_terms(combine_logits(zb, value_logits, alpha), terms)
    if not _all_off(repetition_penalty, presence_penalty, frequency_penalty):
        z = apply_penalties(z, prompt_mask, output_counts, repetition_penalty, presence_penalty, frequency_penalty)
    return z


def combine_and_sample(
    base_logits: torch.Tensor | None,
    value_logits: torch.Tensor | None,
    *,
    vocab_map=None,
    alpha: float = 1.0,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    min_p=0.0,
    do_sample: bool = False,
    seed: torch.Tensor | int | None = None,
    offset: torch.Tensor | int = 0,
    generator: torch.Generator | None = None,
    return_logprobs: bool = False,
    backend: str = "auto",
    workspace: torch.Tensor | None = None,
    validate: bool = True,
    repetition_penalty=1.0,
    presence_penalty=0.0,
    frequency_penalty=0.0,
    prompt_mask: torch.Tensor | None = None,
    output_counts: torch.Tensor | None = None,
    row_seed: torch.Tensor | None = None,
    row_step: torch.Tensor | None = None,
    seeded: torch.Tensor | None = None,
    terms: list[torch.Tensor] | None = None,
    term_weights=None,
):
    """See the module docstring. Per-row parameters (penalties included) may be scalars or [B] tensors.

    ``terms`` (a list of [B, V_out] logits of more same-vocabulary models) with ``term_weights`` (one weight each:
    floats, or a [M] fp32 device tensor, which graph replays need): logit arithmetic, z = map(z_base) +
    alpha * z_value + sum_i w_i * z_i, before the penalties (proxy tuning: the value a tuned small model, one term
    its untuned self at -1).

    ``row_seed`` [B] int64, ``row_step`` [B] int64, ``seeded`` [B] bool (all three or none): rows flagged in
    ``seeded`` draw from their own counter-based stream, Philox(row_seed; column, 0, row_step), on both backends
    (the same numbers), so a request with a seed gets the same ids whatever shares its batch; the other rows draw
    from ``seed`` / ``offset`` (kernel) or ``generator`` (torch).

    ``validate=False`` skips the value checks of the sampling parameters (for callers that checked them once,
    like the decoder: validating [B] tensors reads them back to the host); the shapes, dtypes and presence of
    ``prompt_mask`` / ``output_counts`` are always checked (metadata only, no sync). With penalties on, the returned
    logprobs are those of the penalized combined distribution before the warpers.
    """
    _check_logits("base_logits", base_logits)
    _check_logits("value_logits", value_logits)
    if base_logits is None and value_logits is None:
        raise ValueError("combine_and_sample needs base_logits, value_logits or both")
    ref = base_logits if base_logits is not None else value_logits
    b, dev = ref.shape[0], ref.device
    if base_logits is not None and value_logits is not None:
        if base_logits.device != value_logits.device:
            raise ValueError(f"base_logits on {base_logits.device} but value_logits on {value_logits.device}")
        if base_logits.shape[0] != value_logits.shape[0]:
            raise ValueError(f"batch sizes differ: base {base_logits.shape[0]}, value {value_logits.shape[0]}")
    v_out = value_logits.shape[1] if value_logits is not None else (vocab_map.v_value if vocab_map else ref.shape[1])
    if vocab_map is not None:
        if base_logits is not None and base_logits.shape[1] != vocab_map.v_base:
            raise ValueError(
                f"vocab_map expects {vocab_map.v_base} base logits per row, base_logits has {base_logits.shape[1]}"
            )
        if vocab_map.v_value != v_out:
            raise ValueError(f"vocab_map maps to {vocab_map.v_value} value tokens, value_logits has {v_out}")
    elif base_logits is not None and value_logits is not None and base_logits.shape[1] != value_logits.shape[1]:
        raise ValueError(
            f"base vocabulary ({base_logits.shape[1]}) != value vocabulary ({value_logits.shape[1]}) and no vocab_map"
        )
    args = (bool(do_sample), temperature, top_k, top_p, min_p)
    if (
        prompt_mask is None
        and output_counts is None
        and _all_off(repetition_penalty, presence_penalty, frequency_penalty)
    ):
        # no penalties (a decode step's usual case): nothing to check per call
        params = SamplingParams(*args) if validate else SamplingParams.trusted(*args)
    else:
        pen = dict(repetition_penalty=repetition_penalty, presence_penalty=presence_penalty)
        pen.update(frequency_penalty=frequency_penalty)
        # validation names the argument
        params = SamplingParams(*args, **pen) if validate else SamplingParams.trusted(*args, **pen)
        for name, val in pen.items():  # [B] or scalar (a shape check: no sync, so also with validate=False)
            if isinstance(val, torch.Tensor) and val.dim() > 0 and tuple(val.shape) != (b,):
                raise ValueError(f"{name} must be a scalar or a [B={b}] tensor, got shape {tuple(val.shape)}")
        _check_penalty_inputs(prompt_mask, output_counts, b, v_out, dev, params.penalties_on)
    row_seeds = _check_row_seeds(row_seed, row_step, seeded, b, dev)
    terms_t = _check_terms(terms, term_weights, b, v_out, dev)
    be = pick_backend(backend, dev)
    if isinstance(alpha, torch.Tensor):  # one weight per row (a server's requests each choose theirs)
        if be != "torch":
            raise ValueError("a per-row alpha tensor needs backend='torch' (the fused kernel takes one alpha)")
        if tuple(alpha.shape) != (b,):
            raise ValueError(f"alpha must be a float or a [B={b}] tensor, got shape {tuple(alpha.shape)}")
        alpha = alpha.reshape(b, 1)
    if be == "torch":
        return combine_and_sample_ref(
            base_logits,
            value_logits,
            vocab_map=vocab_map,
            alpha=alpha,
            params=params,
            generator=generator,
            return_logprobs=return_logprobs,
            prompt_mask=prompt_mask,
            output_counts=output_counts,
            row_seeds=row_seeds,
            terms=terms_t,
        )
    if terms_t is not None:  # the kernel reads [M, B, V] and [M] fp32 weights
        w = terms_t[1]
        w = w if isinstance(w, torch.Tensor) else torch.tensor(w, dtype=torch.float32).to(dev, non_blocking=True)
        terms_t = (torch.stack(terms_t[0]), w)
    seed_t = _as_row_tensor("seed", 0 if seed is None else seed, 1, torch.int64, dev)
    off_t = _as_row_tensor("offset", offset, 1, torch.int64, dev)
    ell = vocab_map.ell(dev) if (vocab_map is not None and base_logits is not None) else (None, None)
    pen_t = (None, None, None, None, None)  # HAS_PENALTY=False in the kernel
    if params.penalties_on:
        pen_t = (
            prompt_mask,
            output_counts,
            _as_row_tensor("repetition_penalty", repetition_penalty, b, torch.float32, dev),
            _as_row_tensor("presence_penalty", presence_penalty, b, torch.float32, dev),
            _as_row_tensor("frequency_penalty", frequency_penalty, b, torch.float32, dev),
        )
    ids, lp, bad = _triton_op(
        base_logits,
        value_logits,
        *ell,
        v_out,
        float(alpha),
        _as_row_tensor("temperature", temperature, b, torch.float32, dev),
        _as_row_tensor("top_k", top_k, b, torch.int64, dev),
        _as_row_tensor("top_p", top_p, b, torch.float32, dev),
        _as_row_tensor("min_p", min_p, b, torch.float32, dev),
        seed_t,
        off_t,
        not params.greedy,
        params.top_k_on,
        params.top_p_on,
        params.min_p_on,
        workspace,
        *pen_t,
        *(row_seeds if row_seeds is not None else (None, None, None)),
        *(terms_t if terms_t is not None else (None, None)),
    )
    return ids, (lp if return_logprobs else None), bad


# The Triton launch as a registered op: the dispatcher sees one op (torch.compile can trace it, and the graph
# emulator of ivl_fast.graphs records it like any aten op).
@torch.library.custom_op("ivl_fast_ops::combine_sample_triton", mutates_args=("workspace",))
def _triton_op(
    base: torch.Tensor | None,
    value: torch.Tensor | None,
    map_idx: torch.Tensor | None,
    map_w: torch.Tensor | None,
    v_out: int,
    alpha: float,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    seed: torch.Tensor,
    offset: torch.Tensor,
    do_sample: bool,
    has_topk: bool,
    has_topp: bool,
    has_minp: bool,
    workspace: torch.Tensor | None,
    prompt_mask: torch.Tensor | None = None,
    output_counts: torch.Tensor | None = None,
    repetition_penalty: torch.Tensor | None = None,
    presence_penalty: torch.Tensor | None = None,
    frequency_penalty: torch.Tensor | None = None,
    row_seed: torch.Tensor | None = None,
    row_step: torch.Tensor | None = None,
    seeded: torch.Tensor | None = None,
    terms: torch.Tensor | None = None,
    term_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # the penalty arguments trail with defaults (older positional callers keep working); all five or none:
    # prompt_mask [B, V_out] bool, output_counts [B, V_out] int32, the three penalties [B] fp32
    from ivl_fast.kernels.combine_and_sample import launch

    return launch(
        base,
        value,
        (map_idx, map_w) if map_idx is not None else None,
        v_out,
        alpha,
        temperature,
        top_k,
        top_p,
        min_p,
        seed,
        offset,
        do_sample=do_sample,
        has_topk=has_topk,
        has_topp=has_topp,
        has_minp=has_minp,
        workspace=workspace,
        penalties=(prompt_mask, output_counts, repetition_penalty, presence_penalty, frequency_penalty)
        if prompt_mask is not None
        else None,
        row_seeds=(row_seed, row_step, seeded) if row_seed is not None else None,
        terms=(terms, term_weights) if terms is not None else None,
    )


@_triton_op.register_fake
def _(base, value, map_idx, map_w, v_out, alpha, temperature, *rest):
    ref = base if base is not None else value
    b = ref.shape[0]
    return (
        ref.new_empty(b, dtype=torch.int64),
        ref.new_empty(b, dtype=torch.float32),
        ref.new_empty(b, dtype=torch.bool),
    )
