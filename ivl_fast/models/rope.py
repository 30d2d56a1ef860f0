"""Rotary position embeddings with the scaling variants of the Llama family (default, linear, dynamic, llama3).

Numerics follow transformers: inverse frequencies and angles in fp32, cos/sin cast to the activation dtype.
Dynamic NTK scaling is stateless here: the frequencies are a function of the longest sequence in the batch,
computed on device, so a decode step needs no host sync (transformers recomputes them whenever the sequence
grows past the trained context, which gives the same numbers for monotonically growing sequences).
"""

from __future__ import annotations

import math

import torch

from .config import RopeConfig


def base_inv_freq(theta: float | torch.Tensor, dim: int, device=None) -> torch.Tensor:
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).to(torch.float32) / dim  # [dim/2]
    return 1.0 / (theta**exponents)


def static_inv_freq(rope: RopeConfig, dim: int, device=None) -> torch.Tensor:
    """Frequencies that do not depend on the sequence length (every type but dynamic at short lengths)."""
    inv = base_inv_freq(rope.theta, dim, device)
    if rope.rope_type == "linear":
        return inv / rope.factor
    if rope.rope_type == "llama3":
        low_wavelen = rope.original_max_position_embeddings / rope.low_freq_factor
        high_wavelen = rope.original_max_position_embeddings / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / rope.factor, inv)
        smooth = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv  # default, and dynamic within the trained context


def dynamic_inv_freq(rope: RopeConfig, dim: int, max_pos: int, seq_len: torch.Tensor) -> torch.Tensor:
    """Dynamic NTK frequencies for the current length ``seq_len`` (0-d int tensor on device)."""
    seq = torch.clamp(seq_len, min=max_pos).to(torch.float32)
    theta = rope.theta * ((rope.factor * seq / max_pos) - (rope.factor - 1)) ** (dim / (dim - 2))
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=seq_len.device).to(torch.float32) / dim
    return 1.0 / (theta**exponents)


class Rotary(torch.nn.Module):
    def __init__(self, rope: RopeConfig, head_dim: int, max_position_embeddings: int):
        super().__init__()
        self.rope = rope
        self.dim = head_dim
        self.max_pos = max_position_embeddings
        self.register_buffer("inv_freq", static_inv_freq(rope, head_dim), persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] int64 -> cos, sin [B, T, 1, head_dim] in ``dtype``."""
        if self.rope.rope_type == "dynamic":
            inv = dynamic_inv_freq(self.rope, self.dim, self.max_pos, positions.max() + 1)
        else:
            inv = self.inv_freq.to(positions.device)
        freqs = positions.to(torch.float32)[..., None] * inv.to(torch.float32)  # [B, T, dim/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]  # [B, T, 1, dim]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D] (rotate-half convention of the HF Llama checkpoints)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
