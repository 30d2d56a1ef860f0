"""CrossVocabFeed: the base's side of a batch decoded across vocabularies.

The value network reads the sampled (value) ids one per step; the base reads, per row, what the
:class:`~ivl_fast.decode.cross_vocab.Retokenizer` says after each step (0..k base tokens, rows in lock step, rows
with fewer tokens idle) and keeps its latest logits per row between steps, since a row that read nothing this
step still needs them. Eager (one host sync per step: re-tokenizing is host work).
"""

from __future__ import annotations

import torch

from .cross_vocab import Retokenizer
from .inputs import left_pad
from .model_set import ModelSet


class CrossVocabFeed:
    """``rows`` slots of ``models`` (base and value with their own vocabularies) with the re-tokenizer ``retok``.

    ``zb`` [rows, V_base]: the base's latest logits per row. :meth:`prefill` and :meth:`step` return
    ``(z_base, z_value, grew)``; ``grew``: the base's KV cache was enlarged (new buffers) on the way."""

    def __init__(self, models: ModelSet, retok: Retokenizer, rows: int):
        self.models, self.retok, self.rows = models, retok, rows
        self.zb: torch.Tensor | None = None

    def allocate(self, capacity: int, max_seq_len: int, cols: int, continuous: bool) -> None:
        """The value's cache of ``capacity`` columns; the base's with room for a few base tokens per value token,
        within its context (it grows on demand)."""
        m = self.models
        m.value.allocate(self.rows, capacity)
        room = 2 * max_seq_len + 16 if continuous else self.retok.longest() + 4 * cols + 16
        m.base.allocate(self.rows, min(m.base.max_context, room))
        m.value.free_rows()  # free slots sit at position 0 (rows of an earlier run may sit anywhere)
        m.base.free_rows()
        self.zb = None

    def _grow_to(self, need: int) -> bool:
        base = self.models.base
        if need <= base.max_seq_len:
            return False
        base.grow(min(base.max_context, max(need, 2 * base.max_seq_len)))
        return True

    def prefill(self, prompt, mask, rows: torch.Tensor | None = None):
        """The prompts [n, T] (value ids, left-padded): the base reads their base contexts. ``rows`` [n]: the slots
        they go to (a continuous batch; default: every row)."""
        m, rt = self.models, self.retok
        vb, vv = m.vocab_map.v_base, m.vocab_map.v_value
        pad = rt.base_tokenizer.pad_token_id or 0
        if rows is None:
            bids, bmask = left_pad(rt.base_ctx, pad)
            self.zb = m.base.prefill(bids.to(m.device), bmask.to(m.device))[:, :vb]
            return self.zb, m.value.prefill(prompt, mask)[:, :vv], False
        bids, bmask = left_pad([rt.base_ctx[r] for r in rows.tolist()], pad)
        grew = self._grow_to(bids.shape[1] + 1)  # a longer base prompt than planned
        zb = m.base.prefill(bids.to(m.device), bmask.to(m.device), rows=rows)[:, :vb]
        if self.zb is None:
            self.zb = zb.new_zeros((self.rows, vb))
        self.zb.index_copy_(0, rows, zb)
        return zb, m.value.prefill(prompt, mask, rows=rows)[:, :vv], grew

    def step(self, ids: torch.Tensor, finished: torch.Tensor, slots: bool):
        """Feed the value its token ``ids`` [rows], then the base each row's re-tokenized suffix. ``slots``: rows
        come and go (finished rows and free slots stay where they are in both models)."""
        m, rt = self.models, self.retok
        base = m.base
        zv = m.value.decode(ids, active=~finished if slots else None)[:, : m.vocab_map.v_value]
        keep, feed = rt.advance(ids.tolist(), finished.tolist())  # host sync
        grew = self._grow_to(rt.longest() + 1)  # + a free column for idle rows' writes
        base.rewind(torch.tensor(keep))
        zb = self.zb
        for j in range(max((len(f) for f in feed), default=0)):
            col = torch.tensor([f[j] if j < len(f) else 0 for f in feed], device=m.device)
            act = torch.tensor([j < len(f) for f in feed], device=m.device)
            out = base.decode(col, active=act)[:, : m.vocab_map.v_base]
            zb = torch.where(act[:, None], out, zb)
        self.zb = zb
        return zb, zv, grew


__all__ = ["CrossVocabFeed"]
