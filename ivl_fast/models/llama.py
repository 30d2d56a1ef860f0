"""The lean decoder: Llama and the families that differ from it in switches (``cfg.arch``, one
:class:`~ivl_fast.models.families.LayerSpec` per layer); static KV cache, batched left-padded prefill, graph-safe
decode step.

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
from .layers import LlamaBody
from .rope import Rotary

try:  # optional attention backend
    from flash_attn import flash_attn_with_kvcache  # type: ignore[import-not-found]
except Exception:  # pragma: no cover - flash-attn has no wheel on the CPU machines
    flash_attn_with_kvcache = None

ATTN_BACKENDS = ("sdpa", "flash")


class LeanCausalLM(nn.Module):
    """A lean-family causal LM (Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3, OLMo 2, Granite, SmolLM3) with a
    static KV cache.

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
        # Gemma 3's sliding layers read a table of their own
        self.rotary_local = (
            Rotary(cfg.rope_local, cfg.head_dim, cfg.max_position_embeddings) if cfg.rope_local is not None else None
        )
        self.windows = sorted({layer.self_attn.window or 0 for layer in self.model.layers})  # 0: no window
        # longrope: a row whose length passes this is re-read whole with the long factors (its tokens are kept)
        self.longrope_switch = cfg.rope.original_max_position_embeddings if cfg.rope.rope_type == "longrope" else None
        self.kv = StaticKVCache(
            cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, track_tokens=self.longrope_switch is not None
        )

    def reset_buffers(self, device) -> None:
        """Compute the rotary tables for real (the module was built on the meta device)."""
        self.rotary.reset_buffers(device)
        if self.rotary_local is not None:
            self.rotary_local.reset_buffers(device)

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
                f"(max_position_embeddings={self.config.max_position_embeddings})"
            )
        self.kv.allocate(batch_size, max_seq_len, self.dtype, self.device)

    def grow(self, max_seq_len: int) -> None:
        """Enlarge the KV cache to ``max_seq_len`` columns keeping its contents (not graph-safe: new buffers)."""
        if max_seq_len > self.max_context:
            raise ValueError(f"max_seq_len={max_seq_len} exceeds the model's context of {self.max_context} tokens")
        self.kv.grow(max_seq_len)

    def free(self) -> None:
        self.kv.free()

    # ---------------------------------------------------------------- KV rows: the decode core's only way in
    def use_rows(self, n: int) -> None:
        """Steps run over the cache's first ``n`` rows (a view; the rows above keep their contents) until the next
        ``use_rows`` (a continuous batch skips free slots above every busy one, then takes all its rows back)."""
        self.kv.use_rows(n)

    @torch.inference_mode()
    def free_rows(self, rows: torch.Tensor | None = None) -> None:
        """Empty the contexts of ``rows`` [n] int64 (every row when None): their next token goes to position 0.
        A freed slot stays at 0 while the batch steps over it (decode(active=) does not advance it)."""
        if rows is None:
            self.kv.seq_lens.zero_()
        else:
            self.kv.seq_lens.index_fill_(0, rows, 0)

    def context_lengths(self) -> torch.Tensor:
        """[B] int64, a copy: the tokens each row has read (its next position); ``rewind`` takes it back."""
        return self.kv.seq_lens.clone()

    def cache_token(self) -> tuple[int, int, int]:
        """Changes when the cache is reallocated or another generation claims every row (allocate, a full prefill)
        or a different number of rows is in use: a persistent batch holding the token it saw still owns its rows
        while the token is unchanged."""
        return (self.kv.version, self.kv.claims, self.kv.batch_size)

    @property
    def cache_version(self) -> int:
        """Bumped by every (re)allocation: a graph captured on the cache is valid while this is unchanged."""
        return self.kv.version

    def step_state(self) -> list[torch.Tensor]:
        """The tensors a decode step writes besides the K/V buffers (the row positions [B] int64): snapshot before
        a graph's warm-up or emulated capture, restored after."""
        return [self.kv.seq_lens]

    # ---------------------------------------------------------------- forward passes
    def project(self, hn: torch.Tensor) -> torch.Tensor:
        """Final normed hidden states [.., H] -> logits [.., V] (the head and the family's logit transform; a
        tensor-parallel engine gathers its vocabulary slices in ``head``, so callers never read ``head_weight()``
        for logits)."""
        return self.finish_logits(self.head(hn))

    def head(self, hn: torch.Tensor) -> torch.Tensor:
        return F.linear(hn, self.head_weight())

    def finish_logits(self, z: torch.Tensor) -> torch.Tensor:
        """The head's output -> the model's logits: Granite's 1 / logits_scaling, Gemma 2's c * tanh(z / c)."""
        arch = self.config.arch
        if arch.logit_scale != 1.0:
            z = z * arch.logit_scale
        if arch.final_softcap is not None:
            z = torch.tanh(z / arch.final_softcap) * arch.final_softcap
        return z

    def ropes(self, positions: torch.Tensor, lengths: torch.Tensor | None = None) -> dict:
        """positions [B, T] -> {rotary kind: (cos, sin) [B, T, 1, rotary_dim]} for the kinds the layers read
        (``lengths`` [B]: the row lengths that pick longrope's set, default max(positions) + 1)."""
        out = {"global": self.rotary.cos_sin(positions, self.dtype, lengths)}
        if self.rotary_local is not None:
            out["local"] = self.rotary_local.cos_sin(positions, self.dtype)
        return out

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.project(self.model.norm(h))

    def embed(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings, or ``inputs_embeds`` (rows of the table or mixtures of them: soft_embed), both times
        the family's embedding scale (Gemma sqrt(H) in the weights' dtype, as transformers; Granite's multiplier)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        h = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds.to(self.dtype)
        scale = self.config.arch.embed_scale
        if scale == 1.0:
            return h
        return h * (torch.tensor(scale, dtype=h.dtype) if self.config.arch.norm_offset else scale)

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
        attn = {w: _prefill_mask(mask, position_ids, w) for w in self.windows}
        ropes = self.ropes(position_ids)

        def attend(a, q, k, v):
            return a.sdpa(q, k, v, attn[a.window or 0])

        ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.model.layers:
            if ckpt:
                h = torch.utils.checkpoint.checkpoint(layer, h, ropes, attend, use_reentrant=False)
            else:
                h = layer(h, ropes, attend)
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
        rope_lengths: torch.Tensor | None = None,
        tail_logits: int = 0,
    ) -> torch.Tensor:
        """Left-padded prompts [B, T] + mask [B, T] -> next-token logits [B, V] ([B, T, V] with all_logits, the last
        positions' [B, tail_logits, V] with ``tail_logits``);
        fills the cache. ``inputs_embeds`` [B, T, H] replaces the token embeddings (cascade value networks).
        ``rows`` [B] int64: the cache rows (slots) these prompts go to; the other rows are left untouched
        (default: all rows, B == the allocated batch). ``hidden``: -> (logits [B, V], the last position's final
        normed hidden state [B, H]) (a probe value model reads it). ``rope_lengths`` [B]: the lengths that pick
        longrope's set (a row re-read because it crosses the switch)."""
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
        attn = {w: _prefill_mask(mask, positions, w) for w in self.windows}
        ropes = self.ropes(positions, rope_lengths)
        # gather index that left-aligns each row: cache column j <- prompt column j + pad_b
        shift = (t - lengths)[:, None] + torch.arange(t, device=h.device)[None]  # [B, T]
        shift = shift.clamp(max=t - 1)
        if self.kv.tokens is not None:  # the row's ids, left-aligned (-1: fed as embeddings, cannot be re-read)
            tok = torch.gather(input_ids, 1, shift) if input_ids is not None else torch.full_like(shift, -1)
            if rows is None:
                self.kv.tokens[:, :t].copy_(tok)
            else:
                self.kv.tokens[:, :t].index_copy_(0, rows, tok)
        shift = shift[:, :, None, None]

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
                return a.sdpa(q, k, v, attn[a.window or 0])

            h = layer(h, ropes, attend)
        if rows is None:
            self.seq_lens.copy_(lengths)
            self.kv.claims += 1  # every row rewritten: a persistent batch on this cache lost its rows
        else:
            self.seq_lens.index_copy_(0, rows, lengths)
        if hidden:
            hn = self.model.norm(h[:, -1])
            return self.project(hn), hn
        if tail_logits:
            return self._logits(h[:, -tail_logits:])
        return self._logits(h) if all_logits else self._logits(h[:, -1])

    @torch.inference_mode()
    def rewind(self, lengths: torch.Tensor) -> None:
        """Truncate each row's cached context to ``lengths`` [B] tokens (later writes overwrite the rest)."""
        sw = self.longrope_switch
        back = None
        if sw is not None and self.max_seq_len > sw:  # rows taken back below the switch: re-read with short
            back = (self.seq_lens > sw) & (lengths.to(self.seq_lens.device) <= sw)
        self.kv.rewind(lengths)
        if back is not None:
            self._reread(back, long=False)

    def graph_safe(self, kv_len: int) -> bool:
        """Whether decode/extend steps attending to ``kv_len`` columns can be captured: not for longrope past its
        switch, where a crossing row is re-read (a host check and a prefill of data-dependent rows)."""
        return self.longrope_switch is None or kv_len <= self.longrope_switch

    def _crossing_any(self, rows_mask: torch.Tensor) -> bool:
        """Host check of a longrope crossing (refused while a graph is captured: see graph_safe)."""
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "a longrope model past original_max_position_embeddings cannot run in a captured graph (a row "
                "crossing it is re-read); decode loops run those steps eagerly (LeanCausalLM.graph_safe)"
            )
        return bool(rows_mask.any())  # host sync

    def _reread(self, rows_mask: torch.Tensor, *, long: bool) -> None:
        """Longrope: re-read the whole cached sequence of the rows where ``rows_mask`` [B] bool, with the long
        factors (``long``) or the short ones, as transformers' generate does when a sequence crosses
        original_max_position_embeddings (it drops its cache). Host sync; refused while a graph is captured."""
        if not self._crossing_any(rows_mask):
            return
        idx = rows_mask.nonzero().flatten()
        lens = self.seq_lens[idx]  # [n]
        t = int(lens.max())
        cols = torch.arange(t, device=idx.device)
        pad = t - lens[:, None]  # left padding per row
        src = (cols[None] - pad).clamp(min=0)  # [n, T] position read at each padded column
        ids = torch.gather(self.kv.tokens[idx, :t], 1, src)
        mask = (cols[None] >= pad).long()
        if bool((ids[mask.bool()] < 0).any()):
            raise ValueError(
                "a longrope model fed embeddings (a cascade value network) cannot be re-read past "
                "original_max_position_embeddings; keep its sequences within that length"
            )
        switch = torch.full_like(lens, self.longrope_switch + (1 if long else 0))
        self.prefill(ids.clamp(min=0), mask, rows=idx, rope_lengths=switch)

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
        ropes = self.ropes(pos[:, None])
        rows = torch.arange(b, device=h.device)
        s_len = self.max_seq_len if kv_len is None else kv_len
        if not 0 < s_len <= self.max_seq_len:
            raise ValueError(f"kv_len={kv_len} must be in [1, {self.max_seq_len}] (the cache's columns)")
        sw = self.longrope_switch
        if sw is not None and s_len > sw:  # rows whose length passes the switch with this token: re-read them
            cross = pos == sw
            self._reread(cross if active is None else cross & active.bool(), long=True)
        if self.kv.tokens is not None:
            self.kv.tokens.index_put_((rows, pos), input_ids if input_ids is not None else torch.full_like(pos, -1))
        cols = torch.arange(s_len, device=h.device)
        valid = {
            w: ((cols[None, :] <= pos[:, None]) & ((cols[None, :] > pos[:, None] - w) if w else True))[:, None, None]
            for w in self.windows
        }  # [B, 1, 1, S] per window

        for i, layer in enumerate(self.model.layers):
            kc, vc = self.k_cache[i], self.v_cache[i]

            def attend(a, q, k, v, kc=kc, vc=vc):
                if self.attn_backend == "flash":
                    # NOT YET VALIDATED ON GPU: window_size and softcap (Gemma, Mistral windows) of flash-attn;
                    # passed only where a layer has them (softcap exists from flash-attn 2.6 on)
                    extra = {"window_size": (a.window - 1, 0)} if a.window else {}
                    if a.softcap is not None:
                        extra["softcap"] = a.softcap
                    o = flash_attn_with_kvcache(
                        q,
                        kc,
                        vc,
                        k=k,
                        v=v,
                        cache_seqlens=pos.to(torch.int32),
                        softmax_scale=a.scale,
                        causal=True,
                        **extra,
                    )
                    return o.reshape(b, 1, a.h * a.d)
                kc.index_put_((rows, pos), k[:, 0])
                vc.index_put_((rows, pos), v[:, 0])
                return a.sdpa_decode(q, kc[:, :s_len], vc[:, :s_len], valid[a.window or 0])

            h = layer(h, ropes, attend)
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
        ropes = self.ropes(pos)  # longrope: the row's set for its length after these M tokens (see rope.py)
        rows = torch.arange(b, device=h.device)[:, None].expand(b, m)
        s_len = self.max_seq_len if kv_len is None else kv_len
        if not m <= s_len <= self.max_seq_len:
            raise ValueError(f"kv_len={kv_len} must be in [{m}, {self.max_seq_len}] (the cache's columns)")
        sw = self.longrope_switch
        if sw is not None and s_len > sw and self._crossing_any((self.seq_lens <= sw) & (self.seq_lens + m > sw)):
            # a row crosses the longrope switch inside these tokens: its positions before the switch read the short
            # set, the later ones the whole sequence re-read with the long set; one token at a time does both
            return torch.stack([self.decode(input_ids[:, j], kv_len=kv_len) for j in range(m)], dim=1)
        if self.kv.tokens is not None:
            self.kv.tokens.index_put_((rows, pos), input_ids)
        cols = torch.arange(s_len, device=h.device)
        valid = {
            w: (
                (cols[None, None, :] <= pos[:, :, None]) & ((cols[None, None, :] > pos[:, :, None] - w) if w else True)
            )[:, None]
            for w in self.windows
        }  # [B, 1, M, S] per window

        for i, layer in enumerate(self.model.layers):
            kc, vc = self.k_cache[i], self.v_cache[i]

            def attend(a, q, k, v, kc=kc, vc=vc):
                kc.index_put_((rows, pos), k)
                vc.index_put_((rows, pos), v)
                return a.sdpa(q, kc[:, :s_len], vc[:, :s_len], valid[a.window or 0])

            h = layer(h, ropes, attend)
        self.seq_lens.add_(m)
        return self._logits(h)


def _prefill_mask(mask: torch.Tensor, positions: torch.Tensor | None = None, window: int = 0) -> torch.Tensor:
    """Causal + key-padding mask [B, 1, T, T] (``window`` > 0: and keys less than ``window`` positions back, by
    ``positions`` [B, T]); padded query rows see themselves so no row is all -inf."""
    t = mask.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=mask.device).tril()
    m = causal[None] & mask[:, None, :]
    if window:
        m &= (positions[:, :, None] - positions[:, None, :]) < window
    m |= torch.eye(t, dtype=torch.bool, device=mask.device)[None]
    return m[:, None]
