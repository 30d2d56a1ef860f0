"""Cutting texts into pieces to align, where both tokenizations have a token boundary ("in context").

DTW is quadratic in a piece's length, so a map is built from short pieces. Cutting a text into lines and
tokenizing each line alone changes the tokenization at every cut: a SentencePiece tokenizer adds its dummy prefix
("▁") at the start of each piece, a byte-level one sees no preceding space, so the map learns pairs that never
occur in running text (issue #19). Here each text is tokenized whole, with character offsets, by both tokenizers,
and cut only at character positions where both tokenizations have a boundary (no token of either side straddles
it). Every piece then holds exactly the tokens the tokenizers emit in running text. The build cuts at every
common boundary (each piece is a shortest span the two tokenizations agree on; DTW pairs tokens inside it only);
the evaluation cuts about every 256 characters. A span of more than ``hard_chars`` characters without a common
boundary (rare: spaces and punctuation are boundaries for both) is cut regardless, so no piece grows unbounded.
"""

from __future__ import annotations

import array
import gc
import itertools
from dataclasses import dataclass

import torch


class NoOffsets(Exception):
    """The tokenizer cannot report character offsets (a slow tokenizer): texts cannot be cut in context."""


Encoded = tuple[torch.Tensor, torch.Tensor]  # one text: ids [n] int64, (start, end) character offsets [n, 2] int64


def _as_tensors(ids, offsets) -> Encoded:
    """A tokenization's ids and offsets (Python lists, of ints and of pairs) -> int64 tensors, through array('q')
    (half the time of torch.tensor on a list of pairs)."""
    flat = array.array("q", itertools.chain.from_iterable(offsets))
    return (
        torch.frombuffer(array.array("q", ids), dtype=torch.int64) if len(ids) else torch.zeros(0, dtype=torch.int64),
        torch.frombuffer(flat, dtype=torch.int64).reshape(-1, 2)
        if len(flat)
        else torch.zeros((0, 2), dtype=torch.int64),
    )


def encode_with_offsets(tokenizer, texts: list[str], bar=None) -> tuple[list[Encoded | None], list[int]]:
    """-> (per text (ids [n], (start, end) character offsets [n, 2]) or None where it failed, the failed indices).

    No special tokens. A fast tokenizer encodes all texts in one batched call (on all cores; on failure one at a
    time, to lose only the texts that fail); any other tokenizer is called with ``return_offsets_mapping=True``.
    Raises :class:`NoOffsets` when the tokenizer cannot give offsets at all. ``bar``: advanced once per text."""
    from transformers import PreTrainedTokenizerFast

    rust = tokenizer._tokenizer if isinstance(tokenizer, PreTrainedTokenizerFast) else None  # `tokenizers`' own
    if rust is not None and rust.truncation is None and rust.padding is None:
        try:
            encs = rust.encode_batch(texts, add_special_tokens=False)
            if bar is not None:
                bar.update(len(texts))
            # millions of offset pairs: without the collector, which would rescan the heap as they are made
            # (0.30 s -> 0.06 s for 690k tokens)
            enabled = gc.isenabled()
            gc.disable()
            try:
                return [_as_tensors(e.ids, e.offsets) for e in encs], []
            finally:
                if enabled:
                    gc.enable()
        except Exception:  # some text fails: one at a time below
            pass
    out: list[Encoded | None] = []
    failed = []
    for i, t in enumerate(texts):
        if bar is not None:
            bar.update(1)
        try:
            enc = tokenizer(t, add_special_tokens=False, return_offsets_mapping=True)
        except Exception as e:
            try:  # the text encodes without offsets: the tokenizer has none (transformers 4's slow ones raise)
                tokenizer(t, add_special_tokens=False)
            except Exception:  # a tokenizer error on one text must not lose the whole build
                out.append(None)
                failed.append(i)
                continue
            raise NoOffsets(f"{type(tokenizer).__name__} gives no character offsets ({e})") from e
        if "offset_mapping" not in enc:  # transformers 5's Python tokenizers (PythonBackend) ignore the flag
            raise NoOffsets(f"{type(tokenizer).__name__} gives no character offsets")
        out.append(_as_tensors(list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]))
    return out, failed


@dataclass
class Pieces:
    """Both sides' tokens of the pieces to align, packed: piece i is ``base_ids[base_offsets[i]:base_offsets[i + 1]]``
    against ``value_ids[value_offsets[i]:value_offsets[i + 1]]`` (ids int64, offsets [n + 1] int64: the layout
    ``torch.ops.ivl_fast.align_counts`` reads). ``forced_cuts``: cuts made where no common boundary was near."""

    base_ids: torch.Tensor
    base_offsets: torch.Tensor
    value_ids: torch.Tensor
    value_offsets: torch.Tensor
    forced_cuts: int = 0

    def __len__(self) -> int:
        return self.base_offsets.numel() - 1

    def slice(self, lo: int, hi: int) -> Pieces:
        """Pieces lo..hi-1, packed on their own (offsets from 0)."""
        bo, vo = self.base_offsets[lo : hi + 1], self.value_offsets[lo : hi + 1]
        return Pieces(self.base_ids[bo[0] : bo[-1]], bo - bo[0], self.value_ids[vo[0] : vo[-1]], vo - vo[0])

    def lists(self) -> tuple[list[list[int]], list[list[int]]]:
        """(base token ids per piece, value token ids per piece) as Python lists."""

        def unpack(ids: torch.Tensor, off: torch.Tensor) -> list[list[int]]:
            flat, o = ids.tolist(), off.tolist()
            return [flat[o[i] : o[i + 1]] for i in range(len(o) - 1)]

        return unpack(self.base_ids, self.base_offsets), unpack(self.value_ids, self.value_offsets)

    @classmethod
    def from_lists(cls, base: list[list[int]], value: list[list[int]]) -> Pieces:
        """Pieces from per-piece token lists (e.g. lines tokenized one by one)."""
        if len(base) != len(value):
            raise ValueError(f"{len(base)} base tokenizations but {len(value)} value tokenizations")

        def pack(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
            off = torch.zeros(len(seqs) + 1, dtype=torch.int64)
            off[1:] = torch.tensor([len(s) for s in seqs], dtype=torch.int64).cumsum(0)
            return torch.tensor([x for s in seqs for x in s], dtype=torch.int64), off

        (bi, bo), (vi, vo) = pack(base), pack(value)
        return cls(bi, bo, vi, vo)


def _side(encoded: list[Encoded], starts: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One tokenizer's texts laid end to end -> (ids [N], ends [N], boundaries): each token's end offset in the
    joined characters (text i starts at ``starts[i]``; made monotone, as searchsorted needs), and the sorted
    positions a cut may take on this side: after a token the next token of its text starts at or after (none
    straddles), and every text's end."""
    ids = torch.cat([e for e, _ in encoded])
    off = torch.cat([o for _, o in encoded])
    shift = torch.repeat_interleave(
        torch.tensor(starts, dtype=torch.int64), torch.tensor([e.numel() for e, _ in encoded], dtype=torch.int64)
    )
    begin, ends = off[:, 0] + shift, off[:, 1] + shift
    ends = torch.cummax(ends, 0).values if ends.numel() else ends
    # the next token's start, across a text's end: the next text starts past this one's end, so "ok" there
    ok = torch.ones(ends.numel(), dtype=torch.bool)
    ok[:-1] = begin[1:] >= ends[:-1]
    return ids, ends, ends[ok]


def cut_in_context(
    base: list[Encoded],
    value: list[Encoded],
    lengths: list[int],
    *,
    max_chars: int = 1,
    hard_chars: int = 256,
) -> Pieces:
    """The texts' two tokenizations (``encode_with_offsets`` of each side; ``lengths``: the texts' lengths in
    characters) cut at common boundaries. Every token of both sides is in exactly one piece, in order; pieces
    holding no token of either side are dropped.

    ``max_chars``: the cuts are the last common boundary in each run of ``max_chars`` characters of a text (so
    pieces are under 2 x ``max_chars`` where boundaries are dense). The default, 1, cuts at every common boundary:
    a piece is a shortest span both tokenizations agree on, and DTW pairs tokens only inside it. The build uses it:
    with longer pieces DTW pairs a short token with a neighbour across a shared boundary when that is cheaper in
    edit distance (the demo's "\\nBelvas": base "\\n" | "B" "el" "vas", value "Ċ" | "Belvas"; "B" went with "Ċ",
    1 edit, rather than "Belvas", 5), which is wrong for decoding. The evaluation uses 256, pieces large enough to
    be compared as multisets. ``hard_chars``: a span of more than that without a common boundary is cut every
    ``hard_chars`` characters regardless ("forced" cuts: the tokens on each side are split by their end
    offsets)."""
    if len(base) != len(value) or len(base) != len(lengths):
        raise ValueError(f"{len(base)} base and {len(value)} value tokenizations for {len(lengths)} texts")
    if max_chars < 1 or hard_chars < 1:
        raise ValueError(f"max_chars and hard_chars must be >= 1, got {max_chars} and {hard_chars}")
    n_texts = len(lengths)
    if not n_texts:  # every text failed to tokenize, say: no pieces (the caller reports it)
        none = torch.zeros(0, dtype=torch.int64)
        return Pieces(none, torch.zeros(1, dtype=torch.int64), none, torch.zeros(1, dtype=torch.int64))
    size = torch.tensor(lengths, dtype=torch.int64)
    starts = torch.zeros(n_texts, dtype=torch.int64)
    starts[1:] = torch.cumsum(size + 1, 0)[:-1]  # one character of gap between texts: no cut is in two texts
    ends = starts + size
    b_ids, b_ends, b_cuts = _side(base, starts.tolist())
    v_ids, v_ends, v_cuts = _side(value, starts.tolist())
    # both sorted: a base boundary is common if the value side has it too (searchsorted, not isin: 5x faster)
    if v_cuts.numel() and b_cuts.numel():
        at_v = torch.searchsorted(v_cuts, b_cuts).clamp_max(v_cuts.numel() - 1)
        common = torch.unique_consecutive(b_cuts[v_cuts[at_v] == b_cuts])
    else:
        common = torch.zeros(0, dtype=torch.int64)
    # the last common boundary of each run of max_chars characters, per text
    text = torch.searchsorted(starts, common, right=True) - 1
    run = text * (int(size.max()) // max_chars + 2) + (common - starts[text]) // max_chars
    last = torch.ones(common.numel(), dtype=torch.bool)
    last[:-1] = run[1:] != run[:-1]
    edges = torch.unique(torch.cat([common[last], starts, ends]))  # sorted; each text's start and end included
    # forced cuts inside spans longer than hard_chars
    gap = edges[1:] - edges[:-1]
    extra = torch.clamp((gap - 1) // hard_chars, min=0)  # cuts to add in each span
    forced = int(extra.sum())
    if forced:
        origin = torch.repeat_interleave(edges[:-1], extra)
        k = torch.arange(forced) - torch.repeat_interleave(torch.cumsum(extra, 0) - extra, extra) + 1
        edges = torch.unique(torch.cat([edges, origin + k * hard_chars]))
    at = edges[1:]  # each piece ends at a cut; tokens ending at or before it go left of it

    def offsets(token_ends: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(at.numel() + 1, dtype=torch.int64)
        out[1:] = torch.searchsorted(token_ends, at, right=True)
        return out

    bo, vo = offsets(b_ends), offsets(v_ends)
    keep = (bo[1:] > bo[:-1]) | (vo[1:] > vo[:-1])  # drop empty pieces (the gaps between texts, ...)
    zero = torch.zeros(1, dtype=torch.int64)
    return Pieces(b_ids, torch.cat([zero, bo[1:][keep]]), v_ids, torch.cat([zero, vo[1:][keep]]), forced)
