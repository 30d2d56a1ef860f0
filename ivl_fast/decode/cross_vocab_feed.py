"""CrossVocabFeed: the base's side of a batch decoded across vocabularies.

The value network reads the sampled (value) ids one per step; the base reads, per row, what the
:class:`~ivl_fast.decode.cross_vocab.Retokenizer` says after each step (0..k base tokens, rows in lock step, rows
with fewer tokens idle) and keeps its latest logits per row between steps, since a row that read nothing this
step still needs them. Eager (one host sync per step: re-tokenizing is host work).

Between two different tokenizers it reads boundaries (:mod:`.boundary`): it keeps each row's logits after the
last H + 1 prefixes of its base context (a ring), and where the text may go on inside a longer base token it
returns the base's side already in the value vocabulary (log-probabilities of the mixture), so that the sampler
takes it without the map.
"""

from __future__ import annotations

import torch

from .boundary import mixed_value_logprobs
from .cross_vocab import Retokenizer
from .inputs import left_pad
from .model_set import ModelSet


class CrossVocabFeed:
    """``rows`` slots of ``models`` (base and value with their own vocabularies) with the re-tokenizer ``retok``.

    ``zb`` [rows, V_base]: the base's latest logits per row; ``ring`` [rows, H + 1, V_base] (when the re-tokenizer
    reads boundaries): its logits after the prefixes of lengths ``valid_from[r]`` .. len(context) (slot: length mod
    H + 1). :meth:`prefill` and :meth:`step` return ``(z_base, z_value, grew, pushed)``; ``grew``: the base's KV cache
    was enlarged (new buffers) on the way; ``pushed``: z_base is the base's side already in the value vocabulary
    (log-probabilities [n, V_value]: some row reads a boundary), else the base's logits [n, V_base]."""

    def __init__(self, models: ModelSet, retok: Retokenizer, rows: int):
        self.models, self.retok, self.rows = models, retok, rows
        self._forget()

    def _forget(self) -> None:
        """Hold no logits: no ``zb``, no ``ring``, no valid ring entry."""
        self.zb, self.ring, self.valid_from = None, None, [0] * self.rows

    def allocate(self, capacity: int, max_seq_len: int, cols: int, continuous: bool) -> None:
        """The value's cache of ``capacity`` columns; the base's with room for a few base tokens per value token,
        within its context (it grows on demand)."""
        m = self.models
        m.value.allocate(self.rows, capacity)
        room = 2 * max_seq_len + 16 if continuous else self.retok.longest() + 4 * cols + 16
        m.base.allocate(self.rows, min(m.base.max_context, room))
        m.value.free_rows()  # free slots sit at position 0 (rows of an earlier run may sit anywhere)
        m.base.free_rows()
        self._forget()

    def _grow_to(self, need: int) -> bool:
        base = self.models.base
        if need <= base.max_seq_len:
            return False
        base.grow(min(base.max_context, max(need, 2 * base.max_seq_len)))
        return True

    def _slots(self) -> int:
        return self.retok.reader.max_back + 1

    def _keep_ring(self, rows: list[int], z: torch.Tensor) -> None:
        """Prefill's last logits z [n, <= H + 1, V_base] of ``rows``' base contexts into their ring slots."""
        if self.ring is None:
            self.ring = z.new_zeros((self.rows, self._slots(), z.shape[-1]))
        s, t = self._slots(), z.shape[1]  # t < H + 1 where the prompts are shorter (left-padded: t >= each n)
        for i, r in enumerate(rows):
            n = len(self.retok.base_ctx[r])
            for k in range(min(s, n)):  # the logits after the prefix of length n - k
                self.ring[r, (n - k) % s] = z[i, t - 1 - k]
            self.valid_from[r] = max(1, n - s + 1)

    def _base_side(self, zb: torch.Tensor, rows: list[int], idle: list[bool] | None = None):
        """-> (z, pushed): ``rows``' base logits zb [n, V_base] as they are, or, when one of them reads a boundary,
        the mixture's log-probabilities in the value vocabulary (:func:`.boundary.mixed_value_logprobs`). ``idle``
        [n]: rows that take nothing from this (finished rows, free slots)."""
        rt = self.retok
        if rt.reader is None:
            return zb, False
        plans = [None if idle is not None and idle[i] else rt.plan(r) for i, r in enumerate(rows)]
        if not any(plans):
            return zb, False
        ctx = [rt.base_ctx[r] for r in rows]
        pushed = self.models.vocab_map.apply(zb)
        ring = self.ring[torch.tensor(rows, device=zb.device)]
        return mixed_value_logprobs(ring, [len(c) for c in ctx], ctx, plans, pushed), True

    def prefill(self, prompt, mask, rows: torch.Tensor | None = None):
        """The prompts [n, T] (value ids, left-padded): the base reads their base contexts. ``rows`` [n]: the slots
        they go to (a continuous batch; default: every row)."""
        m, rt = self.models, self.retok
        vb, vv = m.vocab_map.v_base, m.vocab_map.v_value
        pad = rt.base_tokenizer.pad_token_id or 0
        tail = {"tail_logits": self._slots()} if rt.reader is not None else {}
        listed = list(range(self.rows)) if rows is None else rows.tolist()
        bids, bmask = left_pad([rt.base_ctx[r] for r in listed], pad)
        grew = False if rows is None else self._grow_to(bids.shape[1] + 1)  # a longer base prompt than planned
        z = m.base.prefill(bids.to(m.device), bmask.to(m.device), rows=rows, **tail)[..., :vb]
        if tail:
            self._keep_ring(listed, z)
            z = z[:, -1]
        if rows is None:
            self.zb = z
        else:
            if self.zb is None:
                self.zb = z.new_zeros((self.rows, vb))
            self.zb.index_copy_(0, rows, z)
        zv = m.value.prefill(prompt, mask) if rows is None else m.value.prefill(prompt, mask, rows=rows)
        z, pushed = self._base_side(z, listed)
        return z, zv[:, :vv], grew, pushed

    def _plan_feed(self, keep: list[int], feed: list[list[int]], finished: list[bool]) -> None:
        """Rewind further where a row's pending piece needs logits the ring no longer holds (in place)."""
        rt = self.retok
        for r, done in enumerate(finished):
            ctx = rt.base_ctx[r]
            if done or not ctx:
                continue
            plan = rt.plan(r)
            n = len(ctx)
            need = n - (plan.back if plan is not None else 0)  # the shortest prefix whose logits the rule reads
            if need <= keep[r] and need < self.valid_from[r]:
                keep[r] = need - 1
                feed[r] = ctx[keep[r] :]
            if keep[r] + 1 < self.valid_from[r]:
                self.valid_from[r] = keep[r] + 1
            self.valid_from[r] = max(1, self.valid_from[r], n - self._slots() + 1)

    def step(self, ids: torch.Tensor, finished: torch.Tensor, slots: bool):
        """Feed the value its token ``ids`` [rows], then the base each row's re-tokenized suffix. ``slots``: rows
        come and go (finished rows and free slots stay where they are in both models)."""
        m, rt = self.models, self.retok
        base = m.base
        zv = m.value.decode(ids, active=~finished if slots else None)[:, : m.vocab_map.v_value]
        done = finished.tolist()
        keep, feed = rt.advance(ids.tolist(), done)  # host sync
        if rt.reader is not None:
            self._plan_feed(keep, feed, done)
        grew = self._grow_to(rt.longest() + 1)  # + a free column for idle rows' writes
        base.rewind(torch.tensor(keep))
        zb = self.zb
        at = torch.tensor(keep, device=m.device)
        for j in range(max((len(f) for f in feed), default=0)):
            col = torch.tensor([f[j] if j < len(f) else 0 for f in feed], device=m.device)
            act = torch.tensor([j < len(f) for f in feed], device=m.device)
            out = base.decode(col, active=act)[:, : m.vocab_map.v_base]
            zb = torch.where(act[:, None], out, zb)
            if self.ring is not None:  # the logits after the prefix of length keep + j + 1
                where = act.nonzero()[:, 0]
                self.ring[where, (at[where] + j + 1) % self._slots()] = out[where]
        self.zb = zb
        idle = [d or not c for d, c in zip(done, rt.base_ctx, strict=True)]
        z, pushed = self._base_side(zb, list(range(self.rows)), idle)
        return z, zv, grew, pushed

__all__ = ["CrossVocabFeed"]
