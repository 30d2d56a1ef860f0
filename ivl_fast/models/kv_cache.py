"""The static KV store of the lean engine: one preallocated buffer per layer, rows as slots.

Layout: ``k[layer]`` and ``v[layer]`` are [B, S_max, H_kv, D] (flash-attn's ``flash_attn_with_kvcache`` layout).
Row b holds its tokens left-aligned in columns [0, seq_lens[b]); ``seq_lens`` [B] (int64, on device) is both
the number of cached tokens and the position of the next token.

One store serves every batch size: a smaller batch uses a view of the store's first rows (the same view objects
each time), so alternating batch sizes neither reallocates nor invalidates graphs captured on the cache.
``version`` counts reallocations: a graph captured on the cache is valid while the version it saw is current
(the graph cache compares versions; no object-identity guessing). ``claims`` counts the times a generation took
the whole cache (every ``allocate`` and every prefill of all rows): a persistent batch that saw a claim of its
own knows that the rows are still its while the count is unchanged.

``track_tokens``: the store also keeps each row's token ids, ``tokens`` [B, S_max] int64 (column j the token at
position j), for engines that must re-read a row's whole sequence (longrope crossing its switch).
"""

from __future__ import annotations

import torch


class StaticKVCache:
    """Per-layer K/V buffers [rows, cols, H_kv, D] + ``seq_lens`` [rows]; see the module docstring."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, *, track_tokens: bool = False):
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.track_tokens = track_tokens
        self.tokens: torch.Tensor | None = None  # [batch_size, cols] int64 when track_tokens
        self.k: list[torch.Tensor] = []  # views [batch_size, cols, H_kv, D] per layer
        self.v: list[torch.Tensor] = []
        self.seq_lens: torch.Tensor | None = None  # [batch_size] int64
        self.batch_size = 0
        self.cols = 0
        self.version = 0  # bumped by every (re)allocation of the store
        self.claims = 0  # bumped by every allocate() and every prefill of all rows (see the module docstring)
        self._store = None  # (k per layer, v per layer, seq_lens) for the largest batch / length asked for
        self._views: dict = {}  # batch size -> row views of the store (stable objects)

    @property
    def rows(self) -> int:
        """Rows of the underlying store (>= batch_size)."""
        return self._store[2].shape[0] if self._store else 0

    def allocate(self, batch_size: int, cols: int, dtype: torch.dtype, device: torch.device) -> None:
        """Make the store hold ``batch_size`` rows of ``cols`` columns: it grows to the largest batch and length
        asked for (both at once only while that stays within twice the larger request, so a long batch-1 call
        followed by a short wide one does not make a wide-and-long store), else exactly this request."""
        rows, have = (self.rows, self._store[0][0].shape[1]) if self._store else (0, 0)
        stale = self._store is not None and (self._store[0][0].dtype != dtype or self._store[0][0].device != device)
        if stale or batch_size > rows or cols > have:
            union = max(rows, batch_size) * max(have, cols)
            if not stale and union <= 2 * max(rows * have, batch_size * cols):
                self._new_store(max(rows, batch_size), max(have, cols), dtype, device)
            else:
                self._new_store(batch_size, cols, dtype, device)
        self.use_rows(batch_size)
        self.claims += 1

    def _new_store(self, rows: int, cols: int, dtype, device, keep: bool = False) -> None:
        shape = (rows, cols, self.num_kv_heads, self.head_dim)
        ks = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(self.num_layers)]
        vs = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(self.num_layers)]
        seq = torch.zeros(rows, dtype=torch.int64, device=device)
        tok = torch.zeros((rows, cols), dtype=torch.int64, device=device) if self.track_tokens else None
        if keep and self._store:  # grow: carry the contents over
            old_k, old_v, old_seq, old_tok = self._store
            n, m = old_seq.shape[0], old_k[0].shape[1]
            for new, old in zip(ks + vs, old_k + old_v, strict=True):
                new[:n, :m].copy_(old)
            seq[:n].copy_(old_seq)
            if tok is not None:
                tok[:n, :m].copy_(old_tok)
        self._store, self._views = (ks, vs, seq, tok), {}
        self.version += 1

    def use_rows(self, batch_size: int) -> None:
        view = self._views.get(batch_size)
        if view is None:
            ks, vs, seq, tok = self._store
            view = self._views[batch_size] = (
                [k[:batch_size] for k in ks],
                [v[:batch_size] for v in vs],
                seq[:batch_size],
                None if tok is None else tok[:batch_size],
            )
        self.k, self.v, self.seq_lens, self.tokens = view
        self.batch_size, self.cols = batch_size, self._store[0][0].shape[1]

    def grow(self, cols: int) -> None:
        """Enlarge to ``cols`` columns keeping the contents (new buffers: graphs on the old ones are stale)."""
        if cols <= self.cols:
            return
        if self._store is None:
            raise RuntimeError("grow() needs an allocated cache: call allocate(batch_size, max_seq_len) first")
        k0 = self._store[0][0]
        self._new_store(self.rows, cols, k0.dtype, k0.device, keep=True)
        self.use_rows(self.batch_size)

    def free(self) -> None:
        self.k, self.v, self.seq_lens, self.tokens = [], [], None, None
        self._store, self._views = None, {}
        self.batch_size = self.cols = 0
        self.version += 1

    def rewind(self, lengths: torch.Tensor) -> None:
        """Truncate each row's context to ``lengths`` [B] tokens (later writes overwrite the rest)."""
        self.seq_lens.copy_(lengths.to(self.seq_lens))
