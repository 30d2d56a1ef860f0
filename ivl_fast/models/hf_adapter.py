"""Any ``transformers`` causal LM behind the engine interface (dynamic cache; the reference/fallback path)."""

from __future__ import annotations

import inspect

import torch


def longrope_switch(config) -> int | None:
    """The length past which a LongRoPE model (Phi-3, Phi-3.5, Phi-4-mini) switches from its short to its long
    rotary factors (``original_max_position_embeddings``), or None for any other rope type. transformers' rotary
    embedding picks one factor set per forward, by the batch's largest position (``max(position_ids) + 1 > switch``:
    long), so keys cached before the switch were rotated with the other set."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if not isinstance(rope, dict):
        return None
    # one dict, or one per layer type ({"full_attention": {...}, "sliding_attention": {...}})
    entries = list(rope.values()) if rope and all(isinstance(v, dict) for v in rope.values()) else [rope]
    switches = []
    for r in entries:
        if (r.get("rope_type") or r.get("type")) not in ("longrope", "su"):  # "su": its old name
            continue
        omp = r.get("original_max_position_embeddings") or getattr(config, "original_max_position_embeddings", None)
        if omp:
            switches.append(int(omp))
    return min(switches) if switches else None


def cache_kwarg(model) -> str:
    """The name ``model.forward`` takes (and its output returns) the KV cache by: ``cache`` from transformers 5.25
    (``past_key_values`` is deprecated there, to be removed in 5.40), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class HFCausalLM:
    """Wraps an ``AutoModelForCausalLM`` so the decoder can drive it like the lean engine.

    Left-padded prompts keep their padding in HF's cache; the attention mask grows by one column per step and
    positions are counted per row, as ``transformers.generate`` does. Implements
    :class:`~ivl_fast.models.engine.Engine` with no capability (not graph-capturable, no rewind, no slots).

    LongRoPE (:func:`longrope_switch`): when a decode step takes the batch past ``original_max_position_embeddings``,
    the cache (rotated with the short factors) is dropped and the whole sequence so far is run again, as Phi-3's
    ``prepare_inputs_for_generation`` does in ``generate``; so such a model keeps the token ids it has seen until then.
    """

    supports_graphs = False
    supports_rewind = False
    supports_inputs_embeds = False
    supports_slots = False
    supports_extend = False

    def __init__(self, model):
        self.model = model.eval()
        cfg = model.config
        self.config = cfg
        self._max_context = int(
            getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 1 << 30
        )
        self._cache_kwarg = cache_kwarg(model)
        self._longrope_switch = longrope_switch(cfg)
        self._ids: torch.Tensor | None = None  # [B, T] every token so far, while a LongRoPE switch lies ahead
        self._past = None
        self._mask: torch.Tensor | None = None
        self._lens: torch.Tensor | None = None
        self.batch_size = 0
        self.max_seq_len = 0

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    @property
    def max_context(self) -> int:
        return self._max_context

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def head_weight(self) -> torch.Tensor:
        return self.model.get_output_embeddings().weight

    def allocate(self, batch_size: int, max_seq_len: int) -> None:
        if max_seq_len > self.max_context:
            raise ValueError(f"max_seq_len={max_seq_len} exceeds the model's context of {self.max_context} tokens")
        self.batch_size, self.max_seq_len = batch_size, max_seq_len

    def free(self) -> None:
        self._past = self._mask = self._lens = self._ids = None

    def forward(self, input_ids, attention_mask=None, position_ids=None) -> torch.Tensor:
        """Cache-free full pass: [B, T] -> logits [B, T, V] (positions count real tokens, as in the lean engine)."""
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
        if position_ids is None:
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        return self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False).logits

    __call__ = forward

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.long()
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=pos, use_cache=True)
        self._past, self._mask, self._lens = out[self._cache_kwarg], mask, mask.sum(-1)
        # the ids are kept only while the cache holds short-factor keys that a later step must recompute
        switch = self._longrope_switch
        self._ids = input_ids if switch is not None and int(self._lens.max()) <= switch else None  # host sync
        return out.logits[:, -1]

    @torch.inference_mode()
    def decode(self, input_ids: torch.Tensor) -> torch.Tensor:
        b = input_ids.shape[0]
        self._mask = torch.cat([self._mask, self._mask.new_ones(b, 1)], dim=1)
        if self._ids is not None:
            self._ids = torch.cat([self._ids, input_ids[:, None].to(self._ids.dtype)], dim=1)  # [B, T + 1]
            if int(self._lens.max()) + 1 > self._longrope_switch:  # host sync; this step's positions go long
                return self._reprefill()
        out = self.model(
            input_ids=input_ids[:, None],
            attention_mask=self._mask,
            position_ids=self._lens[:, None],
            use_cache=True,
            **{self._cache_kwarg: self._past},
        )
        self._past = out[self._cache_kwarg]
        self._lens = self._lens + 1
        return out.logits[:, -1]

    def _reprefill(self) -> torch.Tensor:
        """The LongRoPE switch: the whole sequence so far (``_ids``, ``_mask`` already holding this step's token) in
        one pass without the cache, so that every key is rotated with the long factors; it becomes the new cache."""
        mask = self._mask
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=self._ids, attention_mask=mask, position_ids=pos, use_cache=True)
        self._past, self._ids = out[self._cache_kwarg], None  # from here every step is past the switch
        self._lens = self._lens + 1
        return out.logits[:, -1]
