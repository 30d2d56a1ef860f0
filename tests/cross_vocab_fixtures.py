"""Helpers for the cross-vocabulary tests: hand-made tokenizers, a scripted value model and a spy on what the
base computes."""

from __future__ import annotations

import torch

from ivl_fast.tiny import corpus_text


def char_level_base_tokenizer():
    """A Llama-1-like base tokenizer without byte fallback: one token per character (no merges), "▁" for spaces,
    <s> before every text and <unk> for each character outside its alphabet (not fused). So a value token of N
    characters costs the base about N tokens, and the replacement character "�" and "中" are both one <unk>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=1, special_tokens=["<unk>", "<s>", "</s>", "<pad>"], show_progress=False)
    tok.train_from_iterator([corpus_text(20_000)], trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def script_value(model, chains: list[list[int]], *, strength: float = 2.0, scale: float = 20.0) -> None:
    """Give a random value model fixed successions: in each chain, token a_i is followed by a_(i+1) with a logit
    margin of about 8 * strength. Each link owns one coordinate j of the residual stream: only a_i's embedding has
    it (scale * e_j), no layer writes to it (its rows of every o_proj / down_proj are zeroed) and only
    a_(i+1)'s lm_head row reads it. Every other token keeps its random behaviour, untouched by the script."""
    links = [(a, b) for ch in chains for a, b in zip(ch[:-1], ch[1:], strict=True)]
    emb, head = model.model.embed_tokens.weight, model.lm_head.weight
    with torch.no_grad():
        coords = torch.arange(len(links))
        emb[:, coords] = 0.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[coords] = 0.0
            layer.mlp.down_proj.weight[coords] = 0.0
        for j, (a, b) in enumerate(links):
            emb[a] = 0.0
            emb[a, j] = scale
            head[b, j] = strength


def bpe_concat_tokenizer(tokens: list[str], merges: list[tuple[str, str]]):
    """A BPE over whitespace-split words with a hand-written vocabulary, decoded by concatenation (no markers: a
    token's surface is itself), <s> a special token (not added)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def byte_fallback_concat_tokenizer(tokens: list[str]):
    """Like bpe_concat_tokenizer (no merges), with the 256 byte-fallback tokens <0x00>..<0xFF> after ``tokens``:
    a character outside ``tokens`` is its UTF-8 bytes, and a byte that does not complete a character decodes as
    "\ufffd" (SentencePiece's reading, Llama's value tokenizers)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = [*tokens, *(f"<0x{x:02X}>" for x in range(256))]
    tok = Tokenizer(
        models.BPE(vocab={t: i for i, t in enumerate(vocab)}, merges=[], unk_token="<unk>", byte_fallback=True)
    )
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


class BaseReads:
    """What the base computes, seen at its engine's interface (prefill, rewind, decode): each row's token context and
    every prefix whose next-token logits it computed. ``needless``: prefixes computed again while the logits kept
    per row (the last MAX_BACK + 1 prefixes, one slot per length mod MAX_BACK + 1) still held them; ``empty``: decode
    passes in which no row read a token."""

    def __init__(self, base, slots: int, monkeypatch):
        self.slots, self.ctx, self.held, self.computed, self.needless, self.empty = slots, {}, {}, 0, [], 0
        self.forced: dict[int, bool] = {}  # a prefix the row no longer held was computed since its last rewind
        self.runs: dict[int, list[list[int]]] = {}  # per row: [length rewound to, tokens read after it] per step
        prefill, rewind, decode = base.prefill, base.rewind, base.decode

        def on_prefill(ids, mask, *, rows=None, tail_logits=0, **kw):
            listed = range(ids.shape[0]) if rows is None else rows.tolist()
            for i, r in enumerate(listed):
                self.ctx[r] = [t for t, m in zip(ids[i].tolist(), mask[i].tolist(), strict=True) if m]
                self.held[r], self.forced[r], self.runs[r] = {}, False, []
                for k in range(min(max(tail_logits, 1), len(self.ctx[r]))):
                    self._computed(r, self.ctx[r][: len(self.ctx[r]) - k], again_ok=True)
            return prefill(ids, mask, rows=rows, tail_logits=tail_logits, **kw)

        def on_rewind(lengths):
            for r, n in enumerate(lengths.tolist()):
                if r in self.ctx:
                    self.ctx[r], self.forced[r] = self.ctx[r][:n], False
                    self.runs[r].append([n, 0])
            return rewind(lengths)

        def on_decode(ids, *, active=None, **kw):
            self.empty += int(active is not None and not bool(active.any()))
            for r, t in enumerate(ids.tolist()):
                if r in self.ctx and (active is None or bool(active[r])):
                    self.ctx[r].append(t)
                    self._computed(r, self.ctx[r])
                    if self.runs[r]:
                        self.runs[r][-1][1] += 1
            return decode(ids, active=active, **kw)

        for name, f in (("prefill", on_prefill), ("rewind", on_rewind), ("decode", on_decode)):
            monkeypatch.setattr(base, name, f)

    def _computed(self, r: int, prefix: list[int], again_ok: bool = False) -> None:
        self.computed += 1
        slot = len(prefix) % self.slots
        held = self.held[r].get(slot) == tuple(prefix)
        # after a prefix it no longer held, the base must read the rest again (its KV cache is one sequence)
        if not again_ok and held and not self.forced[r]:
            self.needless.append((r, len(prefix)))
        self.forced[r] = self.forced[r] or not held
        self.held[r][slot] = tuple(prefix)
