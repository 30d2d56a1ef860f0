"""IVL training loss without materialising [N, V] logits: chunked CE(z_base + z_delta) + L1(z_delta).

Definition (``fused_ce_l1_ref``, exactly)::

    z_b = base_hidden @ base_head.T ; z_d = value_hidden @ value_head.T        # [N, V], fp32
    M   = rows with labels != -100 ; n = |M|
    loss = sum_{i in M} CE(z_b[i] + z_d[i], labels[i]) / n  +  l1 * sum_{i in M} sum_v |z_d[i, v]| / (n * V)

``value_softcap`` / ``base_softcap`` c (Gemma 2's final logit soft-capping): that model's logits are
c * tanh(z / c) (the gradient through it is (1 - tanh^2), applied to the chunk's gradient block in place). A
logit multiplier (Granite) is the caller's: scale the hidden states.

The base is frozen (stop-gradient): gradients flow to ``value_hidden`` and ``value_head`` only. The fused op
walks the rows in chunks; per chunk it computes both logit blocks, one row-wise pass produces the loss and
overwrites the value logits with their gradient, then two matmuls give the hidden-state gradient and add into
the head gradient. Gradients are computed in the forward pass (as Liger-Kernel does) and scaled in backward.
Peak extra memory: two fp32 [chunk, V] blocks plus the fp32 head gradient.

The Triton path is ``ivl_fast.kernels.fused_ce_l1.ce_l1_rows`` (the repository's ``kernels/fused_ce_l1.py``),
imported where it is used (triton is an optional dependency); ``_ce_l1_rows_torch`` is its torch twin.
"""

from __future__ import annotations

import math

import torch

from ._backend import pick_backend

IGNORE_INDEX = -100


def _cap(z: torch.Tensor, c: float | None) -> torch.Tensor:
    return z if c is None else torch.tanh(z / c) * c


def fused_ce_l1_ref(
    value_hidden, value_head, base_hidden, base_head, labels, l1: float = 1.0, value_softcap=None, base_softcap=None
) -> torch.Tensor:
    """The definition, materialised (use for tests and small sizes). Computes in float64 if given float64."""
    dt = torch.float64 if value_hidden.dtype == torch.float64 else torch.float32
    zb = _cap(base_hidden.to(dt) @ base_head.to(dt).T, base_softcap).detach()
    zd = _cap(value_hidden.to(dt) @ value_head.to(dt).T, value_softcap)
    mask = labels != IGNORE_INDEX
    n = mask.sum().clamp(min=1).to(dt)
    z = zb + zd
    safe = torch.where(mask, labels, torch.zeros_like(labels))
    ce = torch.logsumexp(z, -1) - z.gather(1, safe[:, None])[:, 0]
    l1_rows = zd.abs().sum(-1) / zd.shape[-1]
    return (torch.where(mask, ce + l1 * l1_rows, torch.zeros_like(ce))).sum() / n


def _ce_l1_rows_torch(zb, zd, labels, scale, l1: float) -> torch.Tensor:
    """Torch twin of the Triton row kernel: same in-place contract (zd <- gradient), loss [C]."""
    v = zd.shape[1]
    active = labels != IGNORE_INDEX
    safe = torch.where(active, labels, torch.zeros_like(labels))
    z = zb + zd
    lse = torch.logsumexp(z, -1)
    loss = lse - z.gather(1, safe[:, None])[:, 0] + l1 * zd.abs().sum(-1) / v
    loss = torch.where(active, loss * scale, torch.zeros_like(loss))
    sign = torch.sign(zd)
    torch.exp(z.sub_(lse[:, None]), out=zd)  # zd <- softmax (z is a temporary)
    zd.add_(sign, alpha=l1 / v)
    zd.scatter_add_(1, safe[:, None], -torch.ones_like(zd[:, :1]))
    zd.mul_(torch.where(active, scale, torch.zeros_like(scale))[:, None])
    return loss


def default_chunk(n: int, v: int, h: int) -> int:
    """Rows per chunk: the chunk's logits take about as much memory as the hidden states (Liger's rule)."""
    inc = max(1, math.ceil(v / max(h, 1)))
    return max(1, min(n, 1 << max(0, math.ceil(math.log2(max(1, math.ceil(n / inc)))))))


def _run_chunks(
    value_hidden,
    value_head,
    base_hidden,
    base_head,
    labels,
    scale,
    l1,
    rows_fn,
    chunk,
    acc,
    need_h,
    need_w,
    caps=(None, None),
):
    """The chunk loop: loss (scalar, acc dtype), grad of value_hidden, accumulated grad of value_head."""
    n, hv = value_hidden.shape
    v, dev = value_head.shape[0], value_hidden.device
    grad_h = torch.zeros_like(value_hidden) if need_h else None
    grad_w = torch.zeros(v, hv, dtype=acc, device=dev) if need_w else None
    total = torch.zeros((), dtype=acc, device=dev)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        xh = value_hidden[s:e]
        with torch.no_grad():
            zb = _cap((base_hidden[s:e] @ base_head.T).to(acc), caps[1])  # [C, V]
            zd = (xh @ value_head.T).to(acc)  # [C, V]; becomes d loss / d zd
            if caps[0] is not None:  # zd <- c tanh(zd / c); t kept for the gradient
                t = torch.tanh(zd.div_(caps[0]))
                zd = torch.mul(t, caps[0], out=zd)
            total += rows_fn(zb, zd, labels[s:e], scale, l1).sum()
            del zb
            if caps[0] is not None:  # d/dz of c tanh(z / c) = 1 - tanh^2
                zd.mul_(t.square_().neg_().add_(1.0))
                del t
            if need_h or need_w:
                g = zd.to(value_hidden.dtype)
                if need_h:
                    torch.matmul(g, value_head, out=grad_h[s:e])
                if need_w:
                    grad_w.add_((g.T @ xh).to(acc))
    return total, grad_h, grad_w


class _FusedCEL1(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value_hidden, value_head, base_hidden, base_head, labels, l1, backend, chunk, caps):
        head_dtype = value_head.dtype  # the gradient is returned in the parameter's own dtype
        dev = value_hidden.device
        if backend == "triton":
            from ivl_fast.kernels.fused_ce_l1 import ce_l1_rows as rows_fn
        else:
            rows_fn = _ce_l1_rows_torch
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # accumulate in fp32 (the kernel's contract); the torch path keeps float64 inputs in float64
        acc = torch.float64 if backend == "torch" and value_hidden.dtype == torch.float64 else torch.float32
        labels = labels.to(device=dev, dtype=torch.int64).contiguous()
        n_sup = (labels != IGNORE_INDEX).sum()
        scale = (1.0 / n_sup.clamp(min=1).to(acc)).reshape(1)  # device tensor: no host sync
        # Under autocast (bf16 training) the hidden states arrive in bf16 while the master head stays fp32:
        # run the chunks with autocast off, each head cast once to its hidden states' dtype.
        with torch.autocast(device_type=dev.type, enabled=False):
            total, grad_h, grad_w = _run_chunks(
                value_hidden,
                value_head.to(value_hidden.dtype),
                base_hidden,
                base_head.to(base_hidden.dtype),
                labels,
                scale,
                l1,
                rows_fn,
                chunk,
                acc,
                need_h,
                need_w,
                caps,
            )
        ctx.save_for_backward(grad_h, grad_w)
        ctx.head_dtype = head_dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.head_dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None, None, None, None


def fused_ce_l1(
    value_hidden: torch.Tensor,
    value_head: torch.Tensor,
    base_hidden: torch.Tensor,
    base_head: torch.Tensor,
    labels: torch.Tensor,
    l1: float = 1.0,
    backend: str = "auto",
    chunk_size: int | None = None,
    value_softcap: float | None = None,
    base_softcap: float | None = None,
) -> torch.Tensor:
    """Scalar IVL loss; differentiable w.r.t. ``value_hidden`` [N, Hv] and ``value_head`` [V, Hv].

    ``base_hidden`` [N, Hb] and ``base_head`` [V, Hb] are treated as constants. ``labels`` [N], -100 = ignored.
    ``value_softcap`` / ``base_softcap``: that model's logits are c * tanh(z / c) (Gemma 2).
    """
    for name, t, dims in (
        ("value_hidden", value_hidden, 2),
        ("value_head", value_head, 2),
        ("base_hidden", base_hidden, 2),
        ("base_head", base_head, 2),
        ("labels", labels, 1),
    ):
        if t.dim() != dims:
            raise ValueError(f"{name} must be {dims}-D, got shape {tuple(t.shape)}")
    n, v = value_hidden.shape[0], value_head.shape[0]
    if base_hidden.shape[0] != n or labels.shape[0] != n:
        raise ValueError(
            f"row counts differ: value_hidden {n}, base_hidden {base_hidden.shape[0]}, labels {labels.shape[0]}"
        )
    if base_head.shape[0] != v:
        raise ValueError(f"vocabularies differ: value_head has {v} rows, base_head {base_head.shape[0]}")
    if value_head.shape[1] != value_hidden.shape[1] or base_head.shape[1] != base_hidden.shape[1]:
        raise ValueError("hidden sizes of the hidden states and their heads differ")
    if labels.dtype.is_floating_point:
        raise ValueError(f"labels must be integer class ids, got {labels.dtype}")
    bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= v))
    if bool(bad.any()):  # host sync: acceptable once per training micro-batch, never silently wrong
        raise ValueError(f"labels hold ids outside [0, {v}) (e.g. {int(labels[bad][0])}); -100 marks ignored rows")
    if not math.isfinite(l1) or l1 < 0:
        raise ValueError(f"l1 must be a finite number >= 0, got {l1!r}")
    for name, c in (("value_softcap", value_softcap), ("base_softcap", base_softcap)):
        if c is not None and not (isinstance(c, int | float) and math.isfinite(c) and c > 0):
            raise ValueError(f"{name} must be None or a finite number > 0, got {c!r}")
    be = pick_backend(backend, value_hidden.device)
    chunk = chunk_size or default_chunk(n, v, value_hidden.shape[1])
    caps = (
        None if value_softcap is None else float(value_softcap),
        None if base_softcap is None else float(base_softcap),
    )
    return _FusedCEL1.apply(value_hidden, value_head, base_hidden, base_head, labels, float(l1), be, chunk, caps)
