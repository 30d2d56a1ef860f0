"""combine_and_sample: the two models' logits -> next token ids (+ logprobs), one fused kernel on GPU.

``z = map(base_logits) + alpha * value_logits`` (map = the sparse base->value vocabulary map, identity when
the vocabularies are equal), then temperature -> top_k -> top_p -> min_p -> sample with exactly the semantics
of :mod:`ivl_fast.sampling` (transformers' warpers). Output vocabulary: the value model's.

Returns ``(ids [B] int64, logprobs [B] fp32 or None, bad [B] bool)``; ``bad`` marks rows whose combined
logits held NaN/inf (a device tensor: the decoder checks it at its stop check, no host sync here). Logprobs are
those of the combined distribution before warping.

Randomness: the Triton kernel draws from Philox(seed; column, row, offset) with ``seed`` and ``offset`` int64
device tensors, so a captured CUDA graph draws fresh numbers when ``offset`` is advanced on device; the same
seed and offset give the same ids. The torch path (CPU) draws from a ``torch.Generator`` instead.
"""

from __future__ import annotations

import torch

from ..sampling import SamplingParams, combine_logits, nonfinite_rows, sample_ref, token_logprobs
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


def combine_and_sample_ref(
    base_logits,
    value_logits,
    *,
    vocab_map=None,
    alpha=1.0,
    params: SamplingParams,
    generator=None,
    return_logprobs=False,
):
    """The torch reference: sparse map, add, warp (sort-based), sample."""
    zb = vocab_map.apply(base_logits) if (vocab_map is not None and base_logits is not None) else base_logits
    z = combine_logits(zb, value_logits, alpha)
    ids = sample_ref(z, params, generator)
    lp = token_logprobs(z, ids) if return_logprobs else None
    return ids, lp, nonfinite_rows(z)


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
):
    """See the module docstring. Per-row parameters may be scalars or [B] tensors.

    ``validate=False`` skips the value checks of the sampling parameters (for callers that checked them once,
    like the decoder: validating [B] tensors reads them back to the host).
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
    params = SamplingParams(*args) if validate else SamplingParams.trusted(*args)  # validation names the argument
    be = pick_backend(backend, dev)
    if be == "torch":
        return combine_and_sample_ref(
            base_logits,
            value_logits,
            vocab_map=vocab_map,
            alpha=alpha,
            params=params,
            generator=generator,
            return_logprobs=return_logprobs,
        )
    seed_t = _as_row_tensor("seed", 0 if seed is None else seed, 1, torch.int64, dev)
    off_t = _as_row_tensor("offset", offset, 1, torch.int64, dev)
    ell = vocab_map.ell(dev) if (vocab_map is not None and base_logits is not None) else (None, None)
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
