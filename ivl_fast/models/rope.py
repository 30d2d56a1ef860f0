"""Rotary position embeddings with the scaling variants of the lean families (default, linear, dynamic, llama3,
longrope) and partial rotary (only the first ``rotary_dim`` dims of a head rotate: Phi-4-mini).

Numerics follow transformers: inverse frequencies and angles in fp32, cos/sin cast to the activation dtype.
Dynamic NTK scaling is stateless here: the frequencies are a function of the longest sequence in the batch,
computed on device, so a decode step needs no host sync (transformers recomputes them whenever the sequence
grows past the trained context, which gives the same numbers for monotonically growing sequences).

Longrope (Phi-3/3.5/4-mini) divides the frequencies by ``short_factor`` while a sequence is at most
``original_max_position_embeddings`` long and by ``long_factor`` past it, for every position of the sequence:
transformers' ``generate`` drops its cache and re-reads the whole sequence when it crosses. Here the choice is
per row (its length so far, this call's tokens included; transformers decides by the longest row of a batch, so
batched transformers runs differ from single ones there), and the engine re-reads a crossing row's whole sequence
as transformers does (every layer's keys change, not only their rotation: ``LeanCausalLM._reread``).
"""

from __future__ import annotations

import math

import torch

from .config import RopeConfig


def base_inv_freq(theta: float | torch.Tensor, dim: int, device=None) -> torch.Tensor:
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).to(torch.float32) / dim  # [dim/2]
    return 1.0 / (theta**exponents)


def rotary_dim(rope: RopeConfig, head_dim: int) -> int:
    return rope.rotary_dim or head_dim


def static_inv_freq(rope: RopeConfig, dim: int, device=None) -> torch.Tensor:
    """Frequencies that do not depend on the sequence length (every type but dynamic at long lengths; longrope's
    short set). ``dim``: the head dim (only the rotary dims get frequencies) -> [rotary_dim / 2]."""
    dim = rotary_dim(rope, dim)
    inv = base_inv_freq(rope.theta, dim, device)
    if rope.rope_type == "longrope":
        return inv / torch.tensor(rope.short_factor, dtype=torch.float32, device=device)
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


def long_inv_freq(rope: RopeConfig, dim: int, device=None) -> torch.Tensor:
    """Longrope's frequencies past the original context [rotary_dim / 2]."""
    dim = rotary_dim(rope, dim)
    return base_inv_freq(rope.theta, dim, device) / torch.tensor(rope.long_factor, dtype=torch.float32, device=device)


class Rotary(torch.nn.Module):
    def __init__(self, rope: RopeConfig, head_dim: int, max_position_embeddings: int):
        super().__init__()
        self.rope = rope
        self.dim = rotary_dim(rope, head_dim)
        self.max_pos = max_position_embeddings
        self.register_buffer("inv_freq", static_inv_freq(rope, head_dim), persistent=False)
        # longrope: the long set (the buffers are recomputed for real after a meta-device build: reset_buffers)
        self.register_buffer(
            "long_inv_freq", long_inv_freq(rope, head_dim) if rope.rope_type == "longrope" else None, persistent=False
        )
        self.head_dim = head_dim

    def reset_buffers(self, device) -> None:
        self.inv_freq = static_inv_freq(self.rope, self.head_dim, device=device)
        if self.rope.rope_type == "longrope":
            self.long_inv_freq = long_inv_freq(self.rope, self.head_dim, device=device)

    def row_inv_freq(self, lengths: torch.Tensor) -> torch.Tensor:
        """Longrope: each row's frequencies for a sequence of ``lengths`` [B] tokens -> [B, rotary_dim / 2]."""
        long = lengths[:, None] > self.rope.original_max_position_embeddings  # [B, 1]
        return torch.where(long, self.long_inv_freq[None], self.inv_freq[None])

    def cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] int64 -> cos, sin [B, T, 1, rotary_dim] in ``dtype`` (longrope: each row's set chosen
        by its length so far, ``lengths`` [B] or max(positions) + 1; cos/sin times the attention factor, as
        transformers)."""
        if self.rope.rope_type == "dynamic":
            inv = dynamic_inv_freq(self.rope, self.dim, self.max_pos, positions.max() + 1)[None, None]
        elif self.rope.rope_type == "longrope":
            n = positions.max(-1).values + 1 if lengths is None else lengths
            inv = self.row_inv_freq(n)[:, None]  # [B, 1, dim/2]
        else:
            inv = self.inv_freq.to(positions.device)[None, None]
        freqs = positions.to(torch.float32)[..., None] * inv.to(torch.float32)  # [B, T, dim/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]  # [B, T, 1, dim]
        cos, sin = emb.cos(), emb.sin()
        if self.rope.attention_factor != 1.0:
            cos, sin = cos * self.rope.attention_factor, sin * self.rope.attention_factor
        return cos.to(dtype), sin.to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D] (rotate-half convention of the HF Llama checkpoints); cos/sin [B, T, 1, R] rotate the first
    R dims (R < D: partial rotary, the rest pass through)."""
    r = cos.shape[-1]
    if r != x.shape[-1]:
        return torch.cat((apply_rotary(x[..., :r], cos, sin), x[..., r:]), dim=-1)
    half = r // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
