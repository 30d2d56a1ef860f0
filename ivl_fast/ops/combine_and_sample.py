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

Two entries: :func:`combine_and_sample` takes the sampling as keywords and validates them; :func:`sample_rows`
takes a trusted :class:`~ivl_fast.ops.row_sampling.RowSampling` (the decode step's: built once by its buffers). The
Triton path is ``ivl_fast.kernels.combine_and_sample`` (the repository's ``kernels/`` folder): :func:`_kernel`
imports it where it is used (triton is an optional dependency), and :func:`_triton_op` is its registered op.
"""

from __future__ import annotations

import functools
import math
import typing

import torch

from ..sampling import apply_penalties, combine_logits, nonfinite_rows, sample_ref, token_logprobs
from ._backend import pick_backend
from .row_sampling import RowSampling


def _check_logits(name: str, t: torch.Tensor | None) -> None:
    if t is None:
        return
    if t.dim() != 2:
        raise ValueError(f"{name} must be [B, V], got shape {tuple(t.shape)}")
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{name} must be float32/float16/bfloat16, got {t.dtype}")


def _pairs(terms) -> list:
    """(list of [B, V] logits, weights: floats or a [M] tensor) or None -> [(logits, weight), ...]."""
    return [] if terms is None else list(zip(terms[0], terms[1], strict=True))


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


def combine_and_sample_ref(
    base_logits, value_logits, rows: RowSampling, *, vocab_map=None, alpha=1.0, return_logprobs=False, terms=None
):
    """The torch reference: sparse map, add (+ the logit terms ``terms``: (list of [B, V_out], weights)), penalties,
    warp (sort-based), sample. Logprobs are those of the penalized combined distribution before the warpers;
    ``bad`` flags the combined logits (before the penalties) holding NaN/inf."""
    zb = vocab_map.apply(base_logits) if (vocab_map is not None and base_logits is not None) else base_logits
    z = combine_logits(zb, value_logits, alpha, _pairs(terms))  # [B, V_out] fp32
    bad = nonfinite_rows(z)
    z = _penalize(z, rows)
    ids = sample_ref(z, rows.params, rows.generator, rows.row_seeds)
    lp = token_logprobs(z, ids) if return_logprobs else None
    return ids, lp, bad


def _penalize(z: torch.Tensor, rows: RowSampling) -> torch.Tensor:
    state = rows.penalty_state()
    if state is None:
        return z
    p = rows.params
    return apply_penalties(z, *state, p.repetition_penalty, p.presence_penalty, p.frequency_penalty)


def penalized_logits(base_logits, value_logits, rows: RowSampling, *, vocab_map=None, alpha=1.0, terms=None):
    """[B, V_out] fp32: the distribution the sampler's logprobs come from (mapped, combined, penalized; before the
    warpers). For the top alternatives of a step (a server's ``top_logprobs``), computed apart from the fused
    kernel, which never materialises it outside its workspace. ``alpha``: a float or [B, 1]."""
    zb = vocab_map.apply(base_logits) if (vocab_map is not None and base_logits is not None) else base_logits
    return _penalize(combine_logits(zb, value_logits, alpha, _pairs(terms)), rows)


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
    """See the module docstring. Per-row parameters (penalties included) may be scalars or [B] tensors; every
    argument is validated (a ValueError names it; [B] tensors are read back once).

    ``terms`` (a list of [B, V_out] logits of more same-vocabulary models) with ``term_weights`` (one weight each:
    floats, or a [M] fp32 device tensor, which graph replays need): logit arithmetic, z = map(z_base) +
    alpha * z_value + sum_i w_i * z_i, before the penalties (proxy tuning: the value a tuned small model, one term
    its untuned self at -1).

    ``row_seed`` [B] int64, ``row_step`` [B] int64, ``seeded`` [B] bool (all three or none): rows flagged in
    ``seeded`` draw from their own counter-based stream, Philox(row_seed; column, 0, row_step), on both backends
    (the same numbers), so a request with a seed gets the same ids whatever shares its batch; the other rows draw
    from ``seed`` / ``offset`` (kernel) or ``generator`` (torch).
    """
    b, v_out, dev = _check_inputs(base_logits, value_logits, vocab_map)
    rows = RowSampling.checked(
        b,
        v_out,
        dev,
        do_sample=do_sample,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        seed=seed,
        offset=offset,
        generator=generator,
        prompt_mask=prompt_mask,
        output_counts=output_counts,
        row_seed=row_seed,
        row_step=row_step,
        seeded=seeded,
    )
    return sample_rows(
        base_logits,
        value_logits,
        rows,
        vocab_map=vocab_map,
        alpha=alpha,
        return_logprobs=return_logprobs,
        backend=backend,
        workspace=workspace,
        terms=terms,
        term_weights=term_weights,
    )


def sample_rows(
    base_logits: torch.Tensor | None,
    value_logits: torch.Tensor | None,
    rows: RowSampling,
    *,
    vocab_map=None,
    alpha=1.0,
    return_logprobs: bool = False,
    backend: str = "auto",
    workspace: torch.Tensor | None = None,
    terms: list[torch.Tensor] | None = None,
    term_weights=None,
):
    """:func:`combine_and_sample` with the sampling given whole and trusted (the decode step's, built once by its
    buffers: no value is read back). Shapes, dtypes and devices are still checked (metadata only, no sync)."""
    b, v_out, dev = _check_inputs(base_logits, value_logits, vocab_map)
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
            rows,
            vocab_map=vocab_map,
            alpha=alpha,
            return_logprobs=return_logprobs,
            terms=terms_t,
        )
    kernel = _kernel()
    x = rows.kernel_inputs(b, dev)
    x.update(base=base_logits, value=value_logits)
    if vocab_map is not None and base_logits is not None:
        x["map_idx"], x["map_w"] = vocab_map.ell(dev)
    if terms_t is not None:  # the kernel reads [M, B, V] and [M] fp32 weights
        w = terms_t[1]
        w = w if isinstance(w, torch.Tensor) else torch.tensor(w, dtype=torch.float32).to(dev, non_blocking=True)
        x["terms"], x["term_weights"] = torch.stack(terms_t[0]), w
    ids, lp, bad = _triton_op([x.get(n) for n in kernel.INPUTS], v_out, float(alpha), workspace)
    return ids, (lp if return_logprobs else None), bad


def _check_inputs(base_logits, value_logits, vocab_map) -> tuple[int, int, torch.device]:
    """The logits and the map agree -> (B, V_out, device); a ValueError says what does not fit."""
    _check_logits("base_logits", base_logits)
    _check_logits("value_logits", value_logits)
    if base_logits is None and value_logits is None:
        raise ValueError("combine_and_sample needs base_logits, value_logits or both")
    ref = base_logits if base_logits is not None else value_logits
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
    return ref.shape[0], v_out, ref.device


@functools.cache
def _kernel():
    """The Triton kernel's module, imported on first use (triton is optional; ``kernels/combine_and_sample.py``)."""
    from ivl_fast.kernels import combine_and_sample

    return combine_and_sample


# The Triton launch as a registered op: the dispatcher sees one op (torch.compile can trace it, and the graph
# emulator of ivl_fast.graphs records it like any aten op). ``inputs``: the kernel's INPUTS in their order (None:
# that path off).
@torch.library.custom_op("ivl_fast_ops::combine_sample_triton", mutates_args=("workspace",))
def _triton_op(
    inputs: typing.List[typing.Optional[torch.Tensor]],  # noqa: UP006, UP045  (torch 2.5's infer_schema: no list[X | None])
    v_out: int,
    alpha: float,
    workspace: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    kernel = _kernel()
    return kernel.launch(dict(zip(kernel.INPUTS, inputs, strict=True)), v_out, alpha, workspace)


@_triton_op.register_fake
def _(inputs, v_out, alpha, workspace):
    ref = inputs[0] if inputs[0] is not None else inputs[1]  # base, value
    b = ref.shape[0]
    return (
        ref.new_empty(b, dtype=torch.int64),
        ref.new_empty(b, dtype=torch.float32),
        ref.new_empty(b, dtype=torch.bool),
    )
