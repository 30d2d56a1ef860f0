"""Boundary-aware reading of the committed text by the base, across vocabularies (token healing, generalised).

Why: the base reads the canonical tokenization of the text so far after every value token (:mod:`.cross_vocab`).
When that text ends inside what the base would read as one longer token, the canonical tokenization is one the
base would not produce for the text that follows: after the value network emits "ANSWER", the base reads
[..., "ANSWER"], while "ANSWER:" is one token of its vocabulary. Its next-token distribution after [..., "ANSWER"]
puts little mass on ":" (in its training "ANSWER" was rarely followed by ":"), so the format is lost.

The rule. c: the base's canonical tokenization of the committed text, n = len(c). For j in [1, H] (and j < n), the
piece s_j is the text of c's last j tokens; a base token t extends s_j when its bytes start with s_j's and go on.
h: the largest j with an extension (none: h = 0). The base conditions on P = c[:n-h], its own tokenization up to
that boundary, and the next text is distributed as the mixture of the ways the base goes on from P consistently
with the committed text, each weighted by the base's own probability of it given P:

  (a) the canonical path: it reads c[n-h:], then its next token b ~ q(. | c), pushed into the value vocabulary
      through the map as without this rule; weight q(c[n-h:] | P), the product of the h conditionals;
  (b) for each j in [1, h]: it reads c[n-h:n-j] canonically, then one token t extending s_j; weight
      q(c[n-h:n-j] | P) * q(t | c[:n-j]); the value's next token is then the value's longest token whose bytes
      are a prefix of t's remainder after s_j (what the value would emit to write that remainder);

normalised by their total. Where no base token extends a piece (h = 0) this is exactly the plain re-tokenization:
the base's distribution after c. It approximates in that (b) counts one extending token after a canonical prefix
(readings of a piece as several non-canonical tokens are left out), keeps the MAX_EXTENSIONS most likely extensions
of a piece, and maps a remainder to its longest value-token prefix.

Shapes: ``ring`` [rows, H + 1, V_base] holds each row's base logits after the prefixes of lengths
len(c) - H .. len(c) (slot: length mod H + 1), kept by :class:`~ivl_fast.decode.cross_vocab_feed.CrossVocabFeed`.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

from ..vocab.align import byte_fallback_ids, surface_strings

MAX_BACK = 3  # H: base tokens a pending piece may span (the ring keeps H + 1 logits per row)
MAX_EXTENSIONS = 64  # the most likely extensions kept per pending piece (by the base's own q(t | P), on device)


@dataclass(frozen=True)
class Extension:
    """How a row's context may go on: ``back`` (h) base tokens of it are pending; ``levels``: per j in [1, h] with
    extensions, (j, base ids [E] extending the text of the last j tokens, value ids [E] each remainder starts with)."""

    back: int
    levels: tuple[tuple[int, tuple[int, ...], tuple[int, ...]], ...]


class BoundaryReader:
    """The base's tokens extending a pending piece, and the value tokens their remainders start with (host side,
    cached per piece)."""

    def __init__(self, base_tokenizer, value_tokenizer, max_back: int = MAX_BACK):
        self.max_back = max_back
        base_vocab = base_tokenizer.get_vocab()
        self.base_surface = surface_strings(base_tokenizer, base_vocab)
        skip = byte_fallback_ids(base_vocab)  # emitted only for bytes no regular token covers
        pairs = sorted((s, i) for i, s in enumerate(self.base_surface) if s and i not in skip)
        self._sorted = [s for s, _ in pairs]
        self._sorted_ids = [i for _, i in pairs]
        value_vocab = value_tokenizer.get_vocab()
        value_surface = surface_strings(value_tokenizer, value_vocab)
        fallback = byte_fallback_ids(value_vocab)
        self.value_of: dict[str, int] = {}
        for i, s in enumerate(value_surface):  # a regular token wins over the byte-fallback token of one byte
            if s and (s not in self.value_of or self.value_of[s] in fallback):
                self.value_of[s] = i
        self._longest_value = max((len(s) for s in self.value_of), default=0)
        self._cache: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}

    def extensions_of(self, piece: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(base ids, value ids): the base tokens whose bytes start with ``piece``'s and go on, and for each the
        value's longest token that is a prefix of the remainder (tokens with no such value token are left out)."""
        got = self._cache.get(piece)
        if got is not None:
            return got
        lo = bisect.bisect_right(self._sorted, piece)  # past the token equal to the piece itself
        hi = bisect.bisect_left(self._sorted, piece + "\U0010ffff")
        base, value = [], []
        for s, t in zip(self._sorted[lo:hi], self._sorted_ids[lo:hi], strict=True):
            rest = s[len(piece) :]
            for n in range(min(len(rest), self._longest_value), 0, -1):
                v = self.value_of.get(rest[:n])
                if v is not None:
                    base.append(t)
                    value.append(v)
                    break
        got = (tuple(base), tuple(value))
        self._cache[piece] = got
        return got

    def plan(self, context: list[int]) -> Extension | None:
        """The pending part of a base context (its canonical tokenization): None where no base token extends any
        of its last pieces (the plain reading is exact there)."""
        levels = []
        piece = ""
        for j in range(1, min(self.max_back, len(context) - 1) + 1):
            surface = self.base_surface[context[-j]]
            if not surface:
                break  # a special token: nothing extends across it
            piece = surface + piece
            base, value = self.extensions_of(piece)
            if base:
                levels.append((j, base, value))
        return Extension(levels[-1][0], tuple(levels)) if levels else None


def mixed_value_logprobs(
    ring: torch.Tensor,
    lengths: list[int],
    contexts: list[list[int]],
    plans: list[Extension | None],
    pushed: torch.Tensor,
) -> torch.Tensor:
    """The rule of the module docstring on device -> log-probabilities [rows, V_value].

    ring [rows, H + 1, V_base]: each row's base logits after its context's last prefixes; lengths [rows]: each
    row's context length (its latest logits sit at slot length mod H + 1); contexts: the base contexts; plans:
    :meth:`BoundaryReader.plan` per row (None: the plain reading); pushed [rows, V_value]: log(softmax(z_base) @ W)
    of each row's latest base logits (the canonical path's next token, already through the map)."""
    out = pushed.float().clone()
    slots = ring.shape[1]
    for r, plan in enumerate(plans):
        if plan is None:
            continue
        n, h = lengths[r], plan.back
        steps = torch.stack([ring[r, (n - h + i) % slots] for i in range(h)]).float().log_softmax(-1)  # [h, Vb]
        path = torch.tensor(contexts[r][n - h : n], device=ring.device)
        prefix = torch.cat([steps.new_zeros(1), steps.gather(1, path[:, None])[:, 0].cumsum(0)])  # [h + 1]
        weights, targets = [prefix[h:]], [None]  # (a): log q(c[n-h:] | P), then the pushed distribution
        for j, base_ids, value_ids in plan.levels:  # (b): c[n-h:n-j], then t extending the last j tokens' text
            lq = prefix[h - j] + steps[h - j, torch.tensor(base_ids, device=ring.device)]
            v = torch.tensor(value_ids, device=ring.device)
            if lq.numel() > MAX_EXTENSIONS:
                lq, keep = lq.topk(MAX_EXTENSIONS)
                v = v[keep]
            weights.append(lq)
            targets.append(v)
        top = torch.cat(weights).max()
        mix = (weights[0] - top).exp() * out[r].exp()
        total = (weights[0] - top).exp().sum()
        for w, v in zip(weights[1:], targets[1:], strict=True):
            mix = mix.index_add(0, v, (w - top).exp())
            total = total + (w - top).exp().sum()
        out[r] = (mix / total).clamp_min(1e-30).log()
    return out

__all__ = ["MAX_BACK", "BoundaryReader", "Extension", "mixed_value_logprobs"]
