"""The lean Llama-family decoder: static KV cache, batched left-padded prefill, graph-safe decode step.

Parameter names are the Hugging Face ones (``model.layers.0.self_attn.q_proj.weight`` ...), so a checkpoint's
state dict loads with ``assign=True`` (no copy) and ``state_dict()`` saves back to the same layout.

The KV cache is a :class:`~ivl_fast.models.kv_cache.StaticKVCache` (``k_cache[layer]`` [B, S_max, H_kv, D], rows
left-aligned, ``seq_lens`` [B] the next position). Prompts arrive left-padded and are re-aligned into the cache
during prefill, so decoding needs neither padding columns nor per-row host bookkeeping. Rows are slots:
``prefill(..., rows=)`` fills some rows and leaves the others as they are; ``decode(active=)`` advances only
the active rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .config import LeanConfig
from .kv_cache import StaticKVCache
from .rope import Rotary, apply_rotary

try:  # optional attention backend
    from flash_attn import flash_attn_with_kvcache  # type: ignore[import-not-found]
except Exception:  # pragma: no cover - flash-attn has no wheel on the CPU machines
    flash_attn_with_kvcache = None

ATTN_BACKENDS = ("sdpa", "flash")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: LeanConfig):
        super().__init__()
        self.h, self.hkv, self.d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.h * self.d, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.hkv * self.d, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.hkv * self.d, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.h * self.d, cfg.hidden_size, bias=cfg.o_bias)
        self.scale = self.d**-0.5

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.h, self.d)
        k = self.k_proj(x).view(b, t, self.hkv, self.d)
        v = self.v_proj(x).view(b, t, self.hkv, self.d)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v  # [B, T, H(kv), D]

    def sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """q [B, Tq, H, D], k/v [B, Tk, Hkv, D], mask [B, 1, Tq, Tk] bool -> [B, Tq, H*D]."""
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        # grouped-query attention without copying the KV cache per head (SDPA's enable_gqa)
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=self.hkv != self.h
        )  # [B, H, Tq, D]
        return o.transpose(1, 2).reshape(q.shape[0], q.shape[2], self.h * self.d)

    def sdpa_decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One query per row: q [B, 1, H, D], k/v [B, S, Hkv, D] (cache views), mask [B, 1, 1, S] -> [B, 1, H*D].

        The H/Hkv query heads that share a KV head become that head's query rows ([B, Hkv, G, D]), so grouped
        attention needs neither enable_gqa nor K/V copies and any SDPA kernel that takes a mask can serve it."""
        b, g = q.shape[0], self.h // self.hkv
        qg = q.reshape(b, self.hkv, g, self.d)  # query head j*G + i serves KV head j (transformers' repeat_kv)
        o = F.scaled_dot_product_attention(qg, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=self.scale)
        return o.reshape(b, 1, self.h * self.d)  # [B, Hkv, G, D] -> heads in order j*G + i


class MLP(nn.Module):
    def __init__(self, cfg: LeanConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LeanConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend) -> torch.Tensor:
        """h [B, T, H]; ``attend(attn_module, q, k, v) -> [B, T, H*D]`` does the cache/mask specific part."""
        a = self.self_attn
        q, k, v = a.qkv(self.input_layernorm(h), cos, sin)
        h = h + a.o_proj(attend(a, q, k, v))
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaBody(nn.Module):
    def __init__(self, cfg: LeanConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LeanCausalLM(nn.Module):
    """Llama/Mistral/Qwen2 causal LM with a static KV cache.

    Implements :class:`~ivl_fast.models.engine.Engine` with every capability.
    """

    supports_graphs = True
    supports_rewind = True
    supports_inputs_embeds = True
    supports_slots = True
    supports_extend = True

    def __init__(self, cfg: LeanConfig, attn_backend: str = "sdpa"):
        super().__init__()
        if attn_backend not in ATTN_BACKENDS:
            raise ValueError(f"attn_backend must be one of {ATTN_BACKENDS}, got {attn_backend!r}")
        if attn_backend == "flash" and flash_attn_with_kvcache is None:
            # a ValueError, as every bad option: the CLI prints it on one line (--attn-backend flash)
            raise ValueError("attn_backend='flash' needs the flash-attn package (pip install flash-attn)")
        self.config = cfg
        self.attn_backend = attn_backend
        self.gradient_checkpointing = False
        self.model = LlamaBody(cfg)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = Rotary(cfg.rope, cfg.head_dim, cfg.max_position_embeddings)
        self.kv = StaticKVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)

    # ---------------------------------------------------------------- properties
    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def max_context(self) -> int:
        return self.config.max_context

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    # ---------------------------------------------------------------- cache (owned by self.kv)
    k_cache = property(lambda self: self.kv.k)  # [B, S_max, H_kv, D] per layer
    v_cache = property(lambda self: self.kv.v)
    seq_lens = property(lambda self: self.kv.seq_lens)  # [B] int64
    batch_size = property(lambda self: self.kv.batch_size)
    max_seq_len = property(lambda self: self.kv.cols)

    def allocate(self, batch_size: int, max_seq_len: int) -> None:
        """Make the static KV cache hold ``batch_size`` rows of up to ``max_seq_len`` tokens (see
        :meth:`StaticKVCache.allocate`; ``free()`` drops it, graphs captured on it hold it until the decoder's
        ``release_graphs()``)."""
        if max_seq_len > self.max_context:
            raise ValueError(
                f"max_seq_len={max_seq_len} exceeds the model's context of {self.max_context} tokens "
                f"(max_position_embeddings={self.config.max_position_embeddings}"
                + (f", sliding_window={self.config.sliding_window})" if self.config.sliding_window else ")")
            )
        self.kv.allocate(batch_size, max_seq_len, self.dtype, self.device)

    def grow(self, max_seq_len: int) -> None:
        """Enlarge the KV cache to ``max_seq_len`` columns keeping its contents (not graph-safe: new buffers)."""
        if max_seq_len > self.max_context:
            raise ValueError(f"max_seq_len={max_seq_len} exceeds the model's context of {self.max_context} tokens")
        self.kv.grow(max_seq_len)

    def free(self) -> None:
        self.kv.free()

    # ---------------------------------------------------------------- forward passes
    def project(self, hn: torch.Tensor) -> torch.Tensor:
        """Final normed hidden states [.., H] -> logits [.., V] (the head; a tensor-parallel engine gathers its
        vocabulary slices here, so callers never read ``head_weight()`` for logits)."""
        return F.linear(hn, self.head_weight())

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.project(self.model.norm(h))

    def embed(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        return self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds.to(self.dtype)

    def soft_embed(self, base_logits: torch.Tensor, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Cascade-scheme input: softmax(z_base) @ E [.., H] (+ E[input_ids] for cascade+), in the model dtype."""
        emb = self.model.embed_tokens.weight  # [V, H]
        if base_logits.shape[-1] != emb.shape[0]:
            raise ValueError(f"base logits have {base_logits.shape[-1]} entries, the embedding {emb.shape[0]} rows")
        probs = base_logits.float().softmax(-1)
        # half-precision weights: a half GEMM (fp32 accumulation) rather than an fp32 copy of the embedding per call
        soft = (probs @ emb) if emb.dtype == torch.float32 else (probs.to(emb.dtype) @ emb)
        soft = soft.to(emb.dtype)
        return soft if input_ids is None else soft + self.model.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        output_hidden: bool = False,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Cache-free full pass: input_ids [B, T] (or inputs_embeds [B, T, H]) -> logits [B, T, V], or the final
        (normed) hidden states [B, T, H] with ``output_hidden=True``. Differentiable (training path).

        Left or right padding via ``attention_mask`` [B, T]; positions default to the count of real tokens.
        ``self.gradient_checkpointing = True`` recomputes each layer in backward instead of storing it.
        """
        h = self.embed(input_ids, inputs_embeds)
        b, t = h.shape[:2]
        mask = (
            torch.ones((b, t), dtype=torch.bool, device=h.device) if attention_mask is None else attention_mask.bool()
        )
        if position_ids is None:
            position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
        attn = _prefill_mask(mask)
        cos, sin = self.rotary.cos_sin(position_ids, self.dtype)

        def attend(a, q, k, v):
            return a.sdpa(q, k, v, attn)

        ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.model.layers:
            if ckpt:
                h = torch.utils.checkpoint.checkpoint(layer, h, cos, sin, attend, use_reentrant=False)
            else:
                h = layer(h, cos, sin, attend)
        return self.model.norm(h) if output_hidden else self._logits(h)

    @torch.inference_mode()
    def prefill(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor,
        *,
        inputs_embeds: torch.Tensor | None = None,
        all_logits: bool = False,
        rows: torch.Tensor | None = None,
        hidden: bool = False,
    ) -> torch.Tensor:
        """Left-padded prompts [B, T] + mask [B, T] -> next-token logits [B, V] ([B, T, V] with all_logits);
        fills the cache. ``inputs_embeds`` [B, T, H] replaces the token embeddings (cascade value networks).
        ``rows`` [B] int64: the cache rows (slots) these prompts go to; the other rows are left untouched
        (default: all rows, B == the allocated batch). ``hidden``: -> (logits [B, V], the last position's final
        normed hidden state [B, H]) (a probe value model reads it)."""
        h = self.embed(input_ids, inputs_embeds)
        b, t = attention_mask.shape
        if (
            self.seq_lens is None
            or t > self.max_seq_len
            or (b != self.batch_size if rows is None else b > self.batch_size)
        ):
            raise RuntimeError(f"prefill of [{b}, {t}] needs allocate(batch_size={b}, max_seq_len>={t}) first")
        mask = attention_mask.bool()
        lengths = mask.sum(-1)  # [B]
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # [B, T]
        attn = _prefill_mask(mask)
        cos, sin = self.rotary.cos_sin(positions, self.dtype)
        # gather index that left-aligns each row: cache column j <- prompt column j + pad_b
        shift = (t - lengths)[:, None] + torch.arange(t, device=h.device)[None]  # [B, T]
        shift = shift.clamp(max=t - 1)[:, :, None, None]

        for i, layer in enumerate(self.model.layers):
            kc, vc = self.k_cache[i], self.v_cache[i]

            def attend(a, q, k, v, kc=kc, vc=vc):
                idx = shift.expand(-1, -1, k.shape[2], k.shape[3])
                if rows is None:
                    kc[:, :t].copy_(torch.gather(k, 1, idx))
                    vc[:, :t].copy_(torch.gather(v, 1, idx))
                else:  # only the admitted slots' rows
                    kc[:, :t].index_copy_(0, rows, torch.gather(k, 1, idx))
                    vc[:, :t].index_copy_(0, rows, torch.gather(v, 1, idx))
                return a.sdpa(q, k, v, attn)

            h = layer(h, cos, sin, attend)
        if rows is None:
            self.seq_lens.copy_(lengths)
            self.kv.claims += 1  # every row rewritten: a persistent batch on this cache lost its rows
        else:
            self.seq_lens.index_copy_(0, rows, lengths)
        if hidden:
            hn = self.model.norm(h[:, -1])
            return self.project(hn), hn
        return self._logits(h) if all_logits else self._logits(h[:, -1])

    @torch.inference_mode()
    def rewind(self, lengths: torch.Tensor) -> None:
        """Truncate each row's cached context to ``lengths`` [B] tokens (later writes overwrite the rest)."""
        self.kv.rewind(lengths)

    def decode(
        self,
        input_ids: torch.Tensor | None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        active: torch.Tensor | None = None,
        kv_len: int | None = None,
        hidden: bool = False,
    ) -> torch.Tensor:
        """One token per row: input_ids [B] (or inputs_embeds [B, H]) -> logits [B, V] (``hidden``: and the final
        normed hidden state [B, H], which a probe value model reads).

        ``active`` [B] bool: rows that really take this token (the others' contexts do not advance; their
        logits are meaningless). ``kv_len``: attend to the first ``kv_len`` cache columns only (the caller
        guarantees every row's position is < kv_len; default: the whole cache), so the attention cost follows
        the sequence length rather than the cache size. Static shapes, no host sync (graph-capturable)."""
        h = self.embed(
            None if input_ids is None else input_ids[:, None], None if inputs_embeds is None else inputs_embeds[:, None]
        )  # [B, 1, H]
        b = h.shape[0]
        pos = self.seq_lens  # [B] position of this token == its cache column
        cos, sin = self.rotary.cos_sin(pos[:, None], self.dtype)
        rows = torch.arange(b, device=h.device)
        s_len = self.max_seq_len if kv_len is None else kv_len
        if not 0 < s_len <= self.max_seq_len:
            raise ValueError(f"kv_len={kv_len} must be in [1, {self.max_seq_len}] (the cache's columns)")
        cols = torch.arange(s_len, device=h.device)
        valid = (cols[None, :] <= pos[:, None])[:, None, None, :]  # [B, 1, 1, S]

        for i, layer in enumerate(self.model.layers):
            kc, vc = self.k_cache[i], self.v_cache[i]

            def attend(a, q, k, v, kc=kc, vc=vc):
                if self.attn_backend == "flash":
                    o = flash_attn_with_kvcache(
                        q, kc, vc, k=k, v=v, cache_seqlens=pos.to(torch.int32), softmax_scale=a.scale, causal=True
                    )
                    return o.reshape(b, 1, a.h * a.d)
                kc.index_put_((rows, pos), k[:, 0])
                vc.index_put_((rows, pos), v[:, 0])
                return a.sdpa_decode(q, kc[:, :s_len], vc[:, :s_len], valid)

            h = layer(h, cos, sin, attend)
        self.seq_lens.add_(1 if active is None else active.to(self.seq_lens.dtype))
        if hidden:
            hn = self.model.norm(h[:, 0])
            return self.project(hn), hn
        return self._logits(h[:, 0])

    def extend(self, input_ids: torch.Tensor, *, kv_len: int | None = None) -> torch.Tensor:
        """Several tokens per row at once, each row from its own position (a speculative verify): input_ids [B, M]
        -> logits [B, M, V] (position i sees the row's context and the first i + 1 of these tokens); their K/V go
        to cache columns seq_lens + i and seq_lens advances by M (rewind() takes back what is not kept).
        ``kv_len``: cache columns to attend to (the caller guarantees seq_lens + M <= kv_len). Static shapes, no
        host sync (graph-capturable); always SDPA (flash-attn's cache kernel is used for one-token decode only)."""
        h = self.embed(input_ids, None)  # [B, M, H]
        b, m = input_ids.shape
        pos = self.seq_lens[:, None] + torch.arange(m, device=h.device)[None]  # [B, M] positions == cache columns
        cos, sin = self.rotary.cos_sin(pos, self.dtype)
        rows = torch.arange(b, device=h.device)[:, None].expand(b, m)
        s_len = self.max_seq_len if kv_len is None else kv_len
        if not m <= s_len <= self.max_seq_len:
            raise ValueError(f"kv_len={kv_len} must be in [{m}, {self.max_seq_len}] (the cache's columns)")
        cols = torch.arange(s_len, device=h.device)
        valid = (cols[None, None, :] <= pos[:, :, None])[:, None]  # [B, 1, M, S]

        for i, layer in enumerate(self.model.layers):
            kc, vc = self.k_cache[i], self.v_cache[i]

            def attend(a, q, k, v, kc=kc, vc=vc):
                kc.index_put_((rows, pos), k)
                vc.index_put_((rows, pos), v)
                return a.sdpa(q, kc[:, :s_len], vc[:, :s_len], valid)

            h = layer(h, cos, sin, attend)
        self.seq_lens.add_(m)
        return self._logits(h)


def _prefill_mask(mask: torch.Tensor) -> torch.Tensor:
    """Causal + key-padding mask [B, 1, T, T]; padded query rows see themselves so no row is all -inf."""
    t = mask.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=mask.device).tril()
    m = causal[None] & mask[:, None, :]
    m |= torch.eye(t, dtype=torch.bool, device=mask.device)[None]
    return m[:, None]
