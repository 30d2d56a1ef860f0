"""The engine interface the decode core drives, with capabilities in place of engine-type checks.

Two engines implement it: :class:`~ivl_fast.models.llama.LeanCausalLM` (static KV cache, every capability) and
:class:`~ivl_fast.models.hf_adapter.HFCausalLM` (any transformers causal LM, dynamic cache, none). The decode
core asks for a capability (``supports(engine, "graphs")``), never for a class.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol, runtime_checkable

import torch

# what an engine may support (each a class attribute ``supports_<name>``)
CAPABILITIES = (
    "graphs",  # decode is graph-safe: static KV cache, static shapes, no host sync; honours kv_len=
    "rewind",  # rewind(lengths) truncates rows' contexts (cross-vocabulary re-tokenization)
    "inputs_embeds",  # prefill/decode accept inputs_embeds (cascade value networks); soft_embed() exists
    "slots",  # prefill(..., rows=) fills some cache rows without touching the others; decode(active=)
    "extend",  # extend(ids [B, M]) feeds several tokens per row from its own position (speculative verify)
)


@runtime_checkable
class Engine(Protocol):
    """A causal LM with a KV cache, driven one token per row per step: what every engine has.

    ``allocate(batch_size, max_seq_len)`` sizes the cache; ``prefill(ids [B, T], mask [B, T]) -> logits [B, V]``
    reads left-padded prompts; ``decode(ids [B]) -> logits [B, V]`` feeds one token per row. The decode core uses
    more only behind a capability (:data:`CAPABILITIES`), through the members :class:`SlotEngine` lists; no decode
    module reads an engine's cache internals.
    """

    config: object
    supports_graphs: bool
    supports_rewind: bool
    supports_inputs_embeds: bool
    supports_slots: bool
    supports_extend: bool

    @property
    def vocab_size(self) -> int: ...

    @property
    def max_context(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    def allocate(self, batch_size: int, max_seq_len: int) -> None: ...

    def free(self) -> None: ...

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor: ...

    def decode(self, input_ids: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class SlotEngine(Engine, Protocol):
    """An engine with every capability (the lean engine): a static cache whose rows are slots.

    graphs: ``decode(ids, kv_len=, active=)`` is capturable; ``graph_safe(kv_len)``; ``cache_version`` (a graph
    captured on the cache is valid while it is unchanged) and ``step_state()`` (the tensors a step writes besides
    K/V: snapshot around a capture). slots: ``prefill(..., rows=)``, ``use_rows(n)``, ``free_rows(rows)``,
    ``cache_token()`` (a persistent batch owns its rows while unchanged). rewind: ``rewind(lengths)``,
    ``context_lengths()``, ``max_seq_len``, ``grow(max_seq_len)``. extend: ``extend(ids [B, M], kv_len=)``.
    inputs_embeds: ``soft_embed(base_logits, ids)``, ``prefill/decode(inputs_embeds=)``.
    """

    @property
    def max_seq_len(self) -> int: ...

    @property
    def cache_version(self) -> int: ...

    def grow(self, max_seq_len: int) -> None: ...

    def graph_safe(self, kv_len: int) -> bool: ...

    def use_rows(self, n: int) -> None: ...

    def free_rows(self, rows: torch.Tensor | None = None) -> None: ...

    def context_lengths(self) -> torch.Tensor: ...

    def cache_token(self) -> tuple[int, int, int]: ...

    def step_state(self) -> list[torch.Tensor]: ...

    def rewind(self, lengths: torch.Tensor) -> None: ...

    def extend(self, input_ids: torch.Tensor, *, kv_len: int | None = None) -> torch.Tensor: ...

    def soft_embed(self, base_logits: torch.Tensor, input_ids: torch.Tensor | None = None) -> torch.Tensor: ...


def supports(engine, capability: str) -> bool:
    """Whether ``engine`` has ``capability`` (one of :data:`CAPABILITIES`)."""
    if capability not in CAPABILITIES:
        raise ValueError(f"capability must be one of {CAPABILITIES}, got {capability!r}")
    return bool(getattr(engine, f"supports_{capability}", False))


def all_support(engines, capability: str) -> bool:
    return all(supports(e, capability) for e in engines)


def graph_safe(engines, kv_len: int) -> bool:
    """Whether steps attending to ``kv_len`` KV columns may be captured for every engine (an engine without a
    ``graph_safe(kv_len)`` of its own is safe wherever it supports graphs; a longrope model is not past its
    switch, where a crossing row is re-read: those steps run eagerly)."""
    return all(e.graph_safe(kv_len) if hasattr(e, "graph_safe") else True for e in engines)


@contextmanager
def first_rows(engines, n: int, total: int) -> Iterator[None]:
    """Steps inside run over the first ``n`` cache rows of every engine (``use_rows``: capability "slots"); all
    ``total`` rows are in use again after, also when the block raises."""
    for e in engines:
        e.use_rows(n)
    try:
        yield
    finally:
        for e in engines:
            e.use_rows(total)
