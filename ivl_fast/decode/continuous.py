"""ContinuousBatch: what a caller may ask of a batch whose requests come and go between rounds.

:class:`~ivl_fast.decode.loop.DecodeLoop` (opened continuous) and :class:`~ivl_fast.decode.speculative_slots.
SpeculativeSlots` are one; ``ivl_fast.serve`` talks to nothing else (no buffer layout, no slot bookkeeping).

The contract:

- ``check_request(i, request) -> SlotRequest``: a request validated at the edge, the defaults filled in (a
  ValueError names request ``i`` and the field); inside, the batch trusts it.
- ``admit_many(requests) -> slots``: all or nothing, one prefill, first tokens emitted.
- ``step() -> bool``: one round for every busy slot; True when every slot has finished. A non-finite row raises
  :class:`~ivl_fast.decode.stops.NonFiniteLogitsError` naming its slot (retire it and carry on).
- ``retire(slot)``: a slot freed between rounds, finished or not; the other rows are untouched.
- ``read_new(slots, seen, window, top_logprobs) -> [NewTokens]``: one device read of what is new in each slot.
- ``tokens(slot)``, ``is_finished(slot)``: one slot's state (a host sync each).
- what it can do per row: ``per_row_alpha``, ``per_row_seeds``, ``max_top_logprobs``, ``max_tokens_per_step``.

The shared part lives here: the buffers (:class:`~ivl_fast.decode.buffers.DecodeBuffers`, the device state) and
the :class:`~ivl_fast.decode.slot_table.SlotTable` (the host's record of busy slots).
"""

from __future__ import annotations

import contextlib

import torch

from .buffers import DecodeBuffers, NewTokens
from .slot_table import SlotTable


class ContinuousBatch:
    """The base of the continuous batches: subclasses implement admission, rounds and retirement."""

    bufs: DecodeBuffers
    table: SlotTable
    models: object  # a ModelSet (its .device)

    per_row_alpha = False  # requests may each bring their alpha
    per_row_seeds = False  # requests may each bring their seed
    max_top_logprobs = 0  # the most top alternatives a request may ask for
    max_tokens_per_step = 1  # tokens a slot may emit in one round

    def check_request(self, i: int, request):
        raise NotImplementedError

    def admit_many(self, requests: list) -> list[int]:
        raise NotImplementedError

    def step(self) -> bool:
        raise NotImplementedError

    def retire(self, slot: int) -> None:
        raise NotImplementedError

    def read_new(
        self, slots: list[int], seen: list[int], window: int, top_logprobs: int = 0, components: int = 0
    ) -> list[NewTokens]:
        """For each busy slot of ``slots``, its output count and at most ``window`` tokens after the ``seen`` it
        has read (one device read; see :meth:`DecodeBuffers.read_new`)."""
        for s in slots:
            self.table.require(s)
        return self.bufs.read_new(slots, seen, window, top_logprobs, components)

    def tokens(self, slot: int) -> list[int]:
        """The new tokens of ``slot`` so far, up to and including its last (host sync)."""
        self.table.require(slot)
        return self.bufs.tokens(slot)

    def is_finished(self, slot: int) -> bool:
        return self.bufs.is_finished(slot)  # host sync

    def on_device(self):
        """CUDA calls that use the current device (streams, capture, synchronize) go to the models' device."""
        dev = self.models.device
        return torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()


__all__ = ["ContinuousBatch", "NewTokens"]
