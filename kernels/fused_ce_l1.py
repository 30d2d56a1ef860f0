"""Row-wise fused IVL loss kernel: cross-entropy of (z_base + z_delta) plus the L1 penalty on z_delta.

For one chunk of rows whose logits were just computed by two matmuls (cuBLAS), one program per row:

    pass 1 (online):  m, s = running max / sum of exp(z - m) over z = zb + zd;  l1 = sum |zd|;  z[label]
    loss_row        = (logsumexp(z) - z[label] + l1_coef * l1 / V) * scale          (0 for ignored rows)
    pass 2 (in place): zd <- (softmax(z) - onehot(label) + l1_coef * sign(zd) / V) * scale

``scale`` (1 / number of supervised rows) lives in a device tensor, so nothing syncs with the host. zb and zd
are fp32 [C, V] (row stride given); all accumulation is fp32; row offsets are int64 (C x 128k overflows int32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

IGNORE_INDEX: tl.constexpr = tl.constexpr(-100)


@triton.jit
def _ce_l1_kernel(
    zb_ptr,
    zd_ptr,  # in: value logits; out: gradient w.r.t. them
    labels_ptr,
    loss_ptr,  # [C] fp32 per-row loss (already scaled)
    scale_ptr,  # [1] fp32: 1 / n_supervised
    stride_b,
    stride_d,
    V,
    l1_coef,
    inv_v,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    zb_row = zb_ptr + row * stride_b
    zd_row = zd_ptr + row * stride_d
    label = tl.load(labels_ptr + row).to(tl.int64)
    scale = tl.load(scale_ptr)
    active = label != IGNORE_INDEX
    offs = tl.arange(0, BLOCK)

    # NOTE: a finite floor instead of -inf keeps (m - m_new) free of inf - inf; logits never get near -1e30
    m = tl.full([BLOCK], -1e30, tl.float32)
    s = tl.zeros([BLOCK], tl.float32)
    l1 = tl.zeros([BLOCK], tl.float32)
    z_label = tl.zeros([BLOCK], tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + offs
        ok = cols < V
        zb = tl.load(zb_row + cols, mask=ok, other=0.0).to(tl.float32)
        zd = tl.load(zd_row + cols, mask=ok, other=0.0).to(tl.float32)
        z = tl.where(ok, zb + zd, float("-inf"))
        m_new = tl.maximum(m, z)
        s = s * tl.exp(m - m_new) + tl.exp(z - m_new)  # masked lanes: exp(-inf) = 0
        m = m_new
        l1 += tl.abs(zd)
        z_label += tl.where(cols == label, z, 0.0)
    m_row = tl.max(m, axis=0)
    s_row = tl.sum(s * tl.exp(m - m_row), axis=0)
    lse = m_row + tl.log(s_row)
    l1_row = tl.sum(l1, axis=0)
    loss = (lse - tl.sum(z_label, axis=0) + l1_coef * l1_row * inv_v) * scale
    tl.store(loss_ptr + row, tl.where(active, loss, 0.0))

    g_scale = tl.where(active, scale, 0.0)
    for start in range(0, V, BLOCK):
        cols = start + offs
        ok = cols < V
        zb = tl.load(zb_row + cols, mask=ok, other=0.0).to(tl.float32)
        zd = tl.load(zd_row + cols, mask=ok, other=0.0).to(tl.float32)
        p = tl.exp(zb + zd - lse)
        sign = tl.where(zd > 0, 1.0, tl.where(zd < 0, -1.0, 0.0))
        g = p - tl.where(cols == label, 1.0, 0.0) + l1_coef * inv_v * sign
        tl.store(zd_row + cols, g * g_scale, mask=ok)


def ce_l1_rows(
    zb: torch.Tensor, zd: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor, l1: float
) -> torch.Tensor:
    """zb, zd [C, V] fp32 (zd overwritten with d loss / d zd), labels [C] int64, scale [1] fp32 -> loss [C]."""
    c, v = zd.shape
    if zb.shape != zd.shape or zd.dtype != torch.float32 or zb.dtype != torch.float32:
        raise ValueError(
            f"zb and zd must be fp32 of one shape, got {zb.dtype}{tuple(zb.shape)}, {zd.dtype}{tuple(zd.shape)}"
        )
    if zb.stride(1) != 1 or zd.stride(1) != 1:
        raise ValueError("zb and zd must be contiguous along the vocabulary")
    loss = torch.empty(c, dtype=torch.float32, device=zd.device)
    if c == 0:
        return loss
    # NOTE: one block spans up to 4096 columns: a 32k vocabulary takes 8 iterations per pass.
    block = min(4096, triton.next_power_of_2(v))
    _ce_l1_kernel[(c,)](
        zb, zd, labels, loss, scale, zb.stride(0), zd.stride(0), v, float(l1), 1.0 / v, BLOCK=block, num_warps=8
    )
    return loss


# Ahead-of-time compile specs (tests/test_kernels_aot.py compiles each for sm_80 and sm_90 without a GPU).
AOT_SPECS = [
    (
        _ce_l1_kernel,
        {
            "zb_ptr": "*fp32",
            "zd_ptr": "*fp32",
            "labels_ptr": "*i64",
            "loss_ptr": "*fp32",
            "scale_ptr": "*fp32",
            "stride_b": "i64",
            "stride_d": "i64",
            "V": "i32",
            "l1_coef": "fp32",
            "inv_v": "fp32",
            "BLOCK": "constexpr",
        },
        {"BLOCK": 4096},
        {"num_warps": 8},
    )
]
