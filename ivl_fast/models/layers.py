"""The lean engine's building blocks: RMSNorm, attention, MLP, a decoder layer and the body, with the families'
switches (``cfg.arch``, one :class:`~ivl_fast.models.families.LayerSpec` per layer). Parameter names are the
Hugging Face ones, so checkpoints load with ``assign=True``. The cache- and mask-specific part of attention is the
engine's (:class:`~ivl_fast.models.llama.LeanCausalLM` passes an ``attend`` callable to each layer)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import LeanConfig
from .families import LayerSpec
from .rope import apply_rotary


class RMSNorm(nn.Module):
    """RMSNorm in fp32; ``offset``: x * (1 + w) (Gemma); ``upcast``: the weight multiplies the fp32 values before the
    cast (Gemma, OLMo 2) rather than after it (Llama). Only half precision tells the three apart."""

    def __init__(self, dim: int, eps: float, *, offset: bool = False, upcast: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.offset, self.upcast = eps, offset, upcast

    def mean_square(self, h: torch.Tensor) -> torch.Tensor:
        """[.., 1] mean of squares over the last dim (a tensor-parallel shard all-reduces it)."""
        return h.pow(2).mean(-1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(self.mean_square(h) + self.eps)
        if self.offset:
            return (h * (1.0 + self.weight.float())).to(dtype)
        if self.upcast:
            return (self.weight * h).to(dtype)
        return self.weight * h.to(dtype)


def make_norm(cfg: LeanConfig, dim: int) -> RMSNorm:
    return RMSNorm(dim, cfg.rms_norm_eps, offset=cfg.arch.norm_offset, upcast=cfg.arch.norm_upcast)


class Attention(nn.Module):
    """Grouped-query attention with the families' variants: fused qkv (Phi-3), q/k norms (per head: Qwen3,
    Gemma 3; over the projection: OLMo 2), a sliding window, tanh score soft-capping (Gemma 2), no rotary (NoPE)."""

    def __init__(self, cfg: LeanConfig, spec: LayerSpec):
        super().__init__()
        arch = cfg.arch
        self.h, self.hkv, self.d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_out, kv_out = self.h * self.d, self.hkv * self.d
        self.fused = arch.fused_qkv
        if self.fused:
            self.qkv_proj = nn.Linear(cfg.hidden_size, q_out + 2 * kv_out, bias=cfg.qkv_bias)
        else:
            self.q_proj = nn.Linear(cfg.hidden_size, q_out, bias=cfg.qkv_bias)
            self.k_proj = nn.Linear(cfg.hidden_size, kv_out, bias=cfg.qkv_bias)
            self.v_proj = nn.Linear(cfg.hidden_size, kv_out, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(q_out, cfg.hidden_size, bias=cfg.o_bias)
        self.qk_norm = arch.qk_norm
        if self.qk_norm is not None:
            per_head = self.qk_norm == "head"
            self.q_norm = make_norm(cfg, self.d if per_head else q_out)
            self.k_norm = make_norm(cfg, self.d if per_head else kv_out)
        self.scale = arch.attn_scale if arch.attn_scale is not None else self.d**-0.5
        self.softcap = arch.attn_softcap
        self.window = spec.window
        self.rope = spec.rope

    def qkv(self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None):
        b, t, _ = x.shape
        if self.fused:
            q, k, v = self.qkv_proj(x).split([self.h * self.d, self.hkv * self.d, self.hkv * self.d], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qk_norm == "proj":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.view(b, t, self.h, self.d), k.view(b, t, self.hkv, self.d), v.view(b, t, self.hkv, self.d)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        if cos is None:  # a NoPE layer
            return q, k, v
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v  # [B, T, H(kv), D]

    def _softcapped(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Gemma 2's attention, which SDPA cannot do: q [B, Hkv, G*Tq or G, .., D] grouped so it broadcasts
        against k/v [B, Hkv, Tk, D]; scores capped c * tanh(s / c), then masked, softmax in fp32."""
        s = torch.matmul(q, k.transpose(-1, -2)) * self.scale
        s = torch.tanh(s / self.softcap) * self.softcap
        s = s.masked_fill(~mask, float("-inf"))
        return torch.matmul(torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype), v)

    def sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """q [B, Tq, H, D], k/v [B, Tk, Hkv, D], mask [B, 1, Tq, Tk] bool -> [B, Tq, H*D]."""
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        b, _, tq, _ = q.shape
        if self.softcap is not None:
            g = self.h // self.hkv  # query head j*G + i reads KV head j: [B, Hkv, G, Tq, D] against [B, Hkv, 1, Tk, D]
            o = self._softcapped(q.reshape(b, self.hkv, g, tq, self.d), k[:, :, None], v[:, :, None], mask[:, :, None])
            o = o.reshape(b, self.h, tq, self.d)
        else:
            # grouped-query attention without copying the KV cache per head (SDPA's enable_gqa)
            o = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=self.hkv != self.h
            )  # [B, H, Tq, D]
        return o.transpose(1, 2).reshape(b, tq, self.h * self.d)

    def sdpa_decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One query per row: q [B, 1, H, D], k/v [B, S, Hkv, D] (cache views), mask [B, 1, 1, S] -> [B, 1, H*D].

        The H/Hkv query heads that share a KV head become that head's query rows ([B, Hkv, G, D]), so grouped
        attention needs neither enable_gqa nor K/V copies and any SDPA kernel that takes a mask can serve it."""
        b, g = q.shape[0], self.h // self.hkv
        qg = q.reshape(b, self.hkv, g, self.d)  # query head j*G + i serves KV head j (transformers' repeat_kv)
        kt, vt = k.transpose(1, 2), v.transpose(1, 2)
        if self.softcap is not None:
            o = self._softcapped(qg, kt, vt, mask)
        else:
            o = F.scaled_dot_product_attention(qg, kt, vt, attn_mask=mask, scale=self.scale)
        return o.reshape(b, 1, self.h * self.d)  # [B, Hkv, G, D] -> heads in order j*G + i


class MLP(nn.Module):
    def __init__(self, cfg: LeanConfig):
        super().__init__()
        self.fused = cfg.arch.fused_qkv  # Phi-3 fuses gate and up as it fuses q, k and v
        if self.fused:
            self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        else:
            self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
            self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.gelu = cfg.arch.act == "gelu_tanh"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        act = F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)
        return self.down_proj(act * up)


class DecoderLayer(nn.Module):
    """One block. Norm layouts (``Arch.norm_layout``), with the checkpoints' module names:
    pre (Llama): h + attn(input_layernorm(h)); h + mlp(post_attention_layernorm(h))
    sandwich (Gemma): h + post_attention_layernorm(attn(input_layernorm(h)));
                      h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))
    post (OLMo 2): h + post_attention_layernorm(attn(h)); h + post_feedforward_layernorm(mlp(h))"""

    def __init__(self, cfg: LeanConfig, spec: LayerSpec):
        super().__init__()
        self.layout = cfg.arch.norm_layout
        self.residual_scale = cfg.arch.residual_scale
        self.self_attn = Attention(cfg, spec)
        self.mlp = MLP(cfg)
        if self.layout != "post":
            self.input_layernorm = make_norm(cfg, cfg.hidden_size)
        self.post_attention_layernorm = make_norm(cfg, cfg.hidden_size)
        if self.layout == "sandwich":
            self.pre_feedforward_layernorm = make_norm(cfg, cfg.hidden_size)
        if self.layout != "pre":
            self.post_feedforward_layernorm = make_norm(cfg, cfg.hidden_size)

    def forward(self, h: torch.Tensor, ropes: dict, attend) -> torch.Tensor:
        """h [B, T, H]; ``ropes[kind]`` the (cos, sin) of each rotary table; ``attend(attn_module, q, k, v) ->
        [B, T, H*D]`` does the cache/mask specific part."""
        a = self.self_attn
        cos, sin = ropes.get(a.rope, (None, None))
        q, k, v = a.qkv(h if self.layout == "post" else self.input_layernorm(h), cos, sin)
        o = a.o_proj(attend(a, q, k, v))
        if self.layout != "pre":
            o = self.post_attention_layernorm(o)
        h = h + (o if self.residual_scale == 1.0 else o * self.residual_scale)
        if self.layout == "pre":
            x = self.post_attention_layernorm(h)
        else:
            x = self.pre_feedforward_layernorm(h) if self.layout == "sandwich" else h
        o = self.mlp(x)
        if self.layout != "pre":
            o = self.post_feedforward_layernorm(o)
        return h + (o if self.residual_scale == 1.0 else o * self.residual_scale)


class LlamaBody(nn.Module):
    def __init__(self, cfg: LeanConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        specs = cfg.layers or tuple(LayerSpec() for _ in range(cfg.num_layers))
        self.layers = nn.ModuleList(DecoderLayer(cfg, spec) for spec in specs)
        self.norm = make_norm(cfg, cfg.hidden_size)
