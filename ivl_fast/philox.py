"""Philox4x32-10 in plain torch: the same uniform draws as Triton's ``tl.philox`` + ``tl.uint_to_uniform_float``.

Why: a request that brings its own ``seed`` must draw the same numbers whichever rows share its batch, whichever
slot it sits in and whichever sampler runs (the fused kernel on GPU, the torch path on CPU). A counter-based
generator keyed by (seed; column, 0, the row's step) gives that: no state to carry, nothing to register with a
CUDA graph, the same bits on every device.

All arithmetic stays in int64 without overflow: a 32 x 32 -> 64-bit product is assembled from four
16 x 16-bit partial products (each < 2^32).
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
_M16 = 0xFFFF
# Philox4x32 constants (Salmon et al. 2011; the values tl.philox uses)
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_TO_UNIFORM = 4.6566127342e-10  # 2^-31, as tl.uint_to_uniform_float scales


def _mul_hi_lo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit halves of a * b for a Python constant a < 2^32 and b int64 in [0, 2^32)."""
    a1, a0 = a >> 16, a & _M16
    b1, b0 = b >> 16, b & _M16
    p00, p01, p10, p11 = a0 * b0, a0 * b1, a1 * b0, a1 * b1
    mid = (p00 >> 16) + (p01 & _M16) + (p10 & _M16)  # < 3 * 2^16
    hi = p11 + (p01 >> 16) + (p10 >> 16) + (mid >> 16)
    lo = ((mid & _M16) << 16) | (p00 & _M16)
    return hi, lo


def philox4x32(seed: torch.Tensor, c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor, rounds=10):
    """The first 32-bit output of Philox4x32-``rounds`` (as int64 in [0, 2^32)), elementwise over broadcast
    int64 tensors: ``seed`` (any int64: its two's-complement halves are the key), counters ``c0..c3`` in
    [0, 2^32)."""
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    shape = torch.broadcast_shapes(seed.shape, c0.shape, c1.shape, c2.shape, c3.shape)
    c0, c1, c2, c3 = (c.expand(shape) for c in (c0, c1, c2, c3))
    k0, k1 = k0.expand(shape), k1.expand(shape)
    for _ in range(rounds):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    return c0


def to_uniform(r: torch.Tensor) -> torch.Tensor:
    """int64 in [0, 2^32) -> fp32 in [0, 1), as ``tl.uint_to_uniform_float`` maps a uint32."""
    v = torch.where(r >= 2**31, _M32 - r, r)  # the int32 view x < 0 -> -x - 1
    return v.to(torch.float32) * _TO_UNIFORM


def row_uniforms(seed: torch.Tensor, step: torch.Tensor, vocab: int) -> torch.Tensor:
    """[R, vocab] fp32 uniforms of rows with their own seeds: Philox(seed[r]; column, 0, step[r]) with
    ``seed``, ``step`` [R] int64. The fused kernel draws exactly these for its seeded rows."""
    cols = torch.arange(vocab, dtype=torch.int64, device=seed.device)[None, :]
    s = step.to(torch.int64)[:, None]
    zero = torch.zeros((), dtype=torch.int64, device=seed.device)
    return to_uniform(philox4x32(seed.to(torch.int64)[:, None], cols, zero, s & _M32, (s >> 32) & _M32))


__all__ = ["philox4x32", "row_uniforms", "to_uniform"]
