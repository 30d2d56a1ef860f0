"""What ``FastIVLDecoder.generate`` returns: :class:`IVLGenerateOutput`, assembled from a finished decode loop."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .components import Components
from .speculative_loop import SpeculativeLoop


@dataclass
class IVLGenerateOutput:
    """Result of :meth:`FastIVLDecoder.generate`.

    sequences: [B, T + n] prompt (left-padded) followed by the new tokens; after EOS / a stop string,
        ``pad_token_id``. ``n`` is the number of steps run (<= max_new_tokens; fewer when every row stopped).
        With ``num_return_sequences=k``, B is k times the number of prompts, each prompt's rows adjacent.
    logprobs: [B, n] log-probability of each new token under the combined distribution (after penalties,
        before the warpers; 0.0 at padded positions), when ``return_logprobs=True``.
    num_new_tokens: [B] new tokens per row, EOS included.
    prompt_length: T. timings: total_s, prefill_s, steps, batch, graphs (kind or "off"), graph_captures.
    finish_reasons: per row, "eos" (an EOS id), "stop" (a stop string) or "length" (the budget).
    scores, logits: as transformers returns them with ``return_dict_in_generate=True`` and ``output_scores`` /
        ``output_logits``: a tuple of n tensors [B, V], one per step; logits are the combined IVL logits
        (z_base, mapped when there is a vocab map, + alpha * z_value), scores what the processors and (sampling)
        warpers make of them (penalties, EOS at -inf before ``min_new_tokens``, temperature, top-k/p, min-p).
    components: with ``return_components=k``, what the value network changed at each step
        (:class:`~ivl_fast.decode.components.Components`: the top-k of the base, of the value's delta and of the
        combination; ``.changed``, ``.changed_fraction()``, ``.steps(row, tokenizer)``).
    ``out["sequences"]`` reads a field as transformers' outputs allow.
    """

    sequences: torch.Tensor
    logprobs: torch.Tensor | None = None
    num_new_tokens: torch.Tensor | None = None
    prompt_length: int = 0
    timings: dict = field(default_factory=dict)
    finish_reasons: list[str] = field(default_factory=list)
    scores: tuple[torch.Tensor, ...] | None = None
    logits: tuple[torch.Tensor, ...] | None = None
    components: Components | None = None

    def __getitem__(self, name: str):
        if not isinstance(name, str) or name.startswith("_") or not hasattr(self, name):
            raise KeyError(name)
        return getattr(self, name)


def loop_sequences(loop) -> torch.Tensor:
    """[b, T + n]: the started rows' prompts (left-padded) and their new tokens (pad after each row's end)."""
    b = loop.prompt.shape[0]
    return torch.cat([loop.prompt, loop.bufs.out[:b, : loop.steps]], dim=1)


def generate_output(loop, elapsed: float) -> IVLGenerateOutput:
    """The output of a finished generate() loop (``elapsed``: its wall time, prefill included)."""
    n, b = loop.steps, loop.prompt.shape[0]
    opts, bufs = loop.opts, loop.bufs
    timings = {
        "total_s": elapsed,
        "prefill_s": loop.prefill_s,
        "steps": n,
        "batch": b,
        "graphs": loop.graph_kind or "off",
        "graph_captures": loop.captures,
    }
    reasons = []
    if isinstance(loop, SpeculativeLoop):  # rounds, drafted, accepted, acceptance_rate
        timings.update(loop.timings())
    else:
        reasons = loop.finish_reasons(b)
    new = loop.num_new_tokens(b)
    scores = tuple(bufs.scores[:b, i].clone() for i in range(n)) if opts.record[0] else None
    logits = tuple(bufs.raw_logits[:b, i].clone() for i in range(n)) if opts.record[1] else None
    comps, k = None, opts.return_components
    if k:
        comps = Components(bufs.comp_ids[:b, :n, :, :k].clone(), bufs.comp_vals[:b, :n, :, :k].clone(), new.clone())
    lp = bufs.logprobs[:b, :n].clone() if opts.return_logprobs else None
    seqs, width = loop_sequences(loop), loop.prompt.shape[1]
    return IVLGenerateOutput(seqs, lp, new, width, timings, reasons, scores, logits, comps)
