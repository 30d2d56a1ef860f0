"""Cross-vocabulary re-tokenization: after every value token, what the base must re-read.

Sampling happens in the value vocabulary (z = log(softmax(z_base) @ W) + alpha z_value: the base's distribution
pushed through the map). Rule for unstable token boundaries:
after each step the base's context is re-derived as the base tokenization of (prompt text + generated text); the
longest common prefix with what the base has already read is kept, the rest of its KV cache is rewound, and the
new suffix is fed (0..k tokens; the loop feeds rows in lock step, rows with fewer tokens idle). So the base's
context always decodes to exactly the text so far, even when new text merges with the previous base token
(" Hel" + "lo" -> " Hello"). This needs the token ids on the host every step (one sync per step).
"""

from __future__ import annotations

import functools
import itertools

from .boundary import BoundaryReader, Extension
from .special_tokens import SpecialTokenTranslation

REPLACEMENT = "\ufffd"  # what a decoder writes for the bytes of an incomplete UTF-8 character


@functools.lru_cache(maxsize=4)
def boundary_reader(base_tokenizer, tokenizer) -> BoundaryReader:
    """One reader per tokenizer pair (its tables take ~0.1 s for 131072 tokens)."""
    return BoundaryReader(base_tokenizer, tokenizer)


def prompt_text(tokenizer, ids) -> str:
    """The text a base with another tokenizer reads for a prompt given as value ids alone (no text).

    The ids do not say which text they came from. Plain text (``tokenizer(text)``: a leading prefix token at most,
    the BOS, or the EOS of a tokenizer without BOS, as lm-eval's empty contexts start) reads as the decoding
    without special tokens, and the base adds its own BOS as its tokenizer does for that text (the reading of
    transformers' assisted generation across tokenizers). Ids holding any other special token (a chat template's
    EOS between turns, role markers such as "[INST]" or "<|start_header_id|>") were rendered: they read as the
    rendered string, special tokens included, so the markers reach the base translated (:mod:`.special_tokens`)
    instead of dropped, and a leading BOS text makes the base read the rest as it reads a rendered string (no
    second BOS, no word-start mark after it). The rendered string is the decoding with special tokens that encodes
    back to the ids: the whole decoding, else the pieces between special tokens decoded each alone (a legacy
    SentencePiece tokenizer, Llama 2's or Mistral v0.1's, marks the start of each piece after a special token with
    a space, which the whole decoding keeps and the pieces' decoding drops). A single chat turn whose markers are
    plain text ("<s><|user|>...") looks like plain text: pass its rendered text (``texts``) for that reading."""
    ids = [int(i) for i in ids]
    bos = getattr(tokenizer, "bos_token_id", None)
    prefix = bos if bos is not None else getattr(tokenizer, "eos_token_id", None)
    rest = ids[1:] if ids and prefix is not None and ids[0] == prefix else ids
    if tokenizer.decode(rest, skip_special_tokens=False) == tokenizer.decode(rest, skip_special_tokens=True):
        return tokenizer.decode(ids, skip_special_tokens=True)
    whole = tokenizer.decode(ids, skip_special_tokens=False)
    if _encodes_to(tokenizer, whole, ids):
        return whole
    specials = set(getattr(tokenizer, "all_special_ids", None) or [])
    specials |= {i for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items() if t.special}
    runs = itertools.groupby(ids, specials.__contains__)  # alternating runs of special and other tokens
    joined = "".join(tokenizer.decode(list(run), skip_special_tokens=False) for _, run in runs)
    return joined if _encodes_to(tokenizer, joined, ids) else whole


def common_prefix(a: list[int], b: list[int], tail: int = 64) -> int:
    """The length of the longest common prefix of ``a`` and ``b``. Contexts agree but for their last few tokens,
    so one list comparison (C speed) covers all but the last ``tail`` tokens and Python scans those; where even
    that prefix differs, halving with list comparisons finds it (a token-by-token Python loop over an 8192-token
    context cost 3 ms per step)."""
    m = min(len(a), len(b))
    lo = max(0, m - tail)
    if a[:lo] != b[:lo]:
        hi, lo = lo - 1, 0  # the answer is in [0, lo): a[:answer] == b[:answer] and a[answer] != b[answer]
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if a[:mid] == b[:mid]:
                lo = mid
            else:
                hi = mid - 1
        return lo
    while lo < m and a[lo] == b[lo]:
        lo += 1
    return lo


def _encodes_to(tokenizer, text: str, ids: list[int]) -> bool:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) == ids


@functools.lru_cache(maxsize=4)
def special_translation(tokenizer, base_tokenizer) -> SpecialTokenTranslation:
    return SpecialTokenTranslation.between(tokenizer, base_tokenizer)


class Retokenizer:
    """Per-row base contexts for a batch of prompts.

    tokenizer: the value model's (the sampled ids); base_tokenizer: the base's; prompt_ids: each row's prompt in
    value ids; texts: each row's prompt text as the base reads it; same_tokens: the two tokenizers are identical
    (then the base reads the value ids themselves); base_context: the base's context limit. ``reader``: where the
    base's text may go on inside a longer base token (:mod:`.boundary`; None for identical tokenizers).
    """

    def __init__(self, tokenizer, base_tokenizer, prompt_ids, texts, same_tokens: bool, base_context: int):
        self.tokenizer, self.base_tokenizer = tokenizer, base_tokenizer
        self.texts, self.same_tokens, self.base_context = list(texts), same_tokens, base_context
        self.reader = None if same_tokens else boundary_reader(base_tokenizer, tokenizer)
        self.specials = None if same_tokens else special_translation(tokenizer, base_tokenizer)
        self.prompt_ids = [list(p) for p in prompt_ids]
        self.prompt_decoded = [tokenizer.decode(p, skip_special_tokens=True) for p in self.prompt_ids]
        self.base_ctx = [list(p) for p in self.prompt_ids] if same_tokens else [self.base_ids(x) for x in self.texts]
        for i, ctx in enumerate(self.base_ctx):
            if not ctx:
                raise ValueError(f"prompt {i} is empty for the base tokenizer")
            if len(ctx) + 1 >= base_context:
                raise ValueError(f"prompt {i} is {len(ctx)} base tokens long; the base's context is {base_context}")
        self.generated: list[list[int]] = [[] for _ in self.texts]  # value ids per row

    @classmethod
    def slots(cls, tokenizer, base_tokenizer, rows: int, same_tokens: bool, base_context: int) -> Retokenizer:
        """``rows`` free slots (a continuous batch): :meth:`context` then :meth:`add` requests, :meth:`remove`
        them; a free slot has an empty base context and is skipped by :meth:`advance` (it is finished)."""
        rt = cls(tokenizer, base_tokenizer, [], [], same_tokens, base_context)
        rt.texts, rt.prompt_ids, rt.prompt_decoded = [""] * rows, [[] for _ in range(rows)], [""] * rows
        rt.base_ctx, rt.generated = [[] for _ in range(rows)], [[] for _ in range(rows)]
        return rt

    def context(self, prompt_ids: list[int], text: str | None, where: str = "") -> tuple[str, list[int]]:
        """A request's (text, base ids) as the base reads its prompt (``text``: default :func:`prompt_text` of
        ``prompt_ids``); ValueError when the base cannot read it (nothing is changed)."""
        if text is None:
            text = prompt_text(self.tokenizer, prompt_ids)
        ctx = list(prompt_ids) if self.same_tokens else self.base_ids(text)
        if not ctx:
            raise ValueError(f"{where}the prompt is empty for the base tokenizer")
        if len(ctx) + 1 >= self.base_context:
            raise ValueError(
                f"{where}the prompt is {len(ctx)} base tokens long; the base's context is {self.base_context}"
            )
        return text, ctx

    def add(self, row: int, prompt_ids: list[int], text: str, base_ctx: list[int]) -> None:
        """Put a request (from :meth:`context`) into free slot ``row``."""
        self.prompt_ids[row], self.texts[row] = list(prompt_ids), text
        self.prompt_decoded[row] = self.tokenizer.decode(self.prompt_ids[row], skip_special_tokens=True)
        self.base_ctx[row], self.generated[row] = list(base_ctx), []

    def remove(self, row: int) -> None:
        self.prompt_ids[row], self.texts[row], self.prompt_decoded[row] = [], "", ""
        self.base_ctx[row], self.generated[row] = [], []

    def base_ids(self, text: str) -> list[int]:
        """The base tokenization of ``text``, with the base's special tokens, but one BOS only: a chat prompt
        rendered with a template already starts with the BOS string ("<s>..."), which the tokenizer would
        otherwise precede with a second one. The value's special tokens in it are first translated for the base
        (:mod:`.special_tokens`: same name, else same role, else text)."""
        if self.specials is not None:
            text = self.specials.translate(text)
        btok = self.base_tokenizer
        bos = btok.bos_token
        add = not (bos and text.startswith(bos))
        return list(btok(text, add_special_tokens=add)["input_ids"])

    def base_context_text(self, row: int) -> str:
        return self.base_tokenizer.decode(self.base_ctx[row], skip_special_tokens=True)

    def generated_text(self, row: int) -> str:
        """The text of the generated value tokens as it reads after the prompt: decoded together with the prompt
        tokens and cut after them, so decoders that strip a leading space ("▁" of SentencePiece) at the start
        of a string do not lose the space between prompt and reply."""
        full = self.tokenizer.decode(self.prompt_ids[row] + self.generated[row], skip_special_tokens=True)
        return full[len(self.prompt_decoded[row]) :]

    def text(self, row: int) -> str:
        """The text so far as the base reads it: the prompt's text, then :meth:`generated_text`. A prompt whose ids
        end inside a UTF-8 character (byte-fallback tokens of an incomplete character) decodes to k trailing
        U+FFFD; where its text ends in those k characters too (ids given alone: their decoding; or a text the
        caller decoded the same way), the reply's tokens that complete the character replace them: the text is cut k
        characters earlier and goes on with the decoding from there."""
        head = self.prompt_decoded[row]
        pending = len(head) - len(head.rstrip(REPLACEMENT))
        text = self.texts[row]
        if not pending or not text.endswith(head[-pending:]):
            return text + self.generated_text(row)
        full = self.tokenizer.decode(self.prompt_ids[row] + self.generated[row], skip_special_tokens=True)
        return text[:-pending] + full[len(head) - pending :]

    def advance(self, ids: list[int], finished: list[bool]) -> tuple[list[int], list[list[int]]]:
        """Take each row's new value token -> (keep [B]: base tokens to keep, feed [B]: base tokens to feed)."""
        keep, feed = [], []
        for r, tok_id in enumerate(ids):
            if finished[r]:
                keep.append(len(self.base_ctx[r]))
                feed.append([])
                continue
            self.generated[r].append(tok_id)
            if self.same_tokens:
                target = self.base_ctx[r] + [tok_id]
            else:
                target = self.base_ids(self.text(r))
            old = self.base_ctx[r]
            n = common_prefix(old, target)
            if target != old and n == len(target):
                # the new tokenization is a prefix of the old one (a partial UTF-8 character completed into a
                # shorter byte string): re-feed its last token so the base's logits follow the new context
                n -= 1
            if len(target) >= self.base_context:  # one free column stays for idle rows' writes
                raise ValueError(
                    f"row {r}: the base context reached {len(target)} tokens, the end of the base model's context "
                    f"({self.base_context}); lower max_new_tokens"
                )
            keep.append(n)
            feed.append(target[n:])
            self.base_ctx[r] = target
        return keep, feed

    def plan(self, row: int) -> Extension | None:
        """How ``row``'s base context may go on inside a longer base token (None: it cannot, or no reader)."""
        ctx = self.base_ctx[row]
        return self.reader.plan(ctx) if self.reader is not None and ctx else None

    def longest(self) -> int:
        return max((len(c) for c in self.base_ctx), default=0)
