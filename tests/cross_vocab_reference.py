"""The definition of decoding across vocabularies, written from its rule with float64 copies of the models (the
reference the cross-vocabulary tests compare the decoder with), and the pair they run on."""

from __future__ import annotations

import copy
import math

import torch
from conftest import build_model

from ivl_fast.tiny import corpus_text, train_tokenizer
from ivl_fast.vocab import VocabMap


def build_cross_setting(tokenizer):
    """(base tokenizer, map, base, value): value on the 512-token BPE of conftest; base on a 700-token BPE trained
    on more text (a real other vocab)."""
    base_tok = train_tokenizer(700, max_chars=150_000)
    vmap = VocabMap.build(base_tok, tokenizer, [corpus_text()[200_000:260_000]], top_k=3)
    base = build_model("llama", seed=0, vocab_size=len(base_tok), hidden_size=96, num_attention_heads=6)
    value = build_model("llama", seed=1, vocab_size=len(tokenizer))
    return base_tok, vmap, base, value


def dense_map(vmap) -> torch.Tensor:
    """W [V_base, V_value] in float64, written from the map's CSR arrays entry by entry."""
    w = torch.zeros(vmap.shape, dtype=torch.float64)
    crow, col, val = vmap.crow.tolist(), vmap.col.tolist(), vmap.val.tolist()
    for b in range(vmap.shape[0]):
        for j in range(crow[b], crow[b + 1]):
            w[b, col[j]] += val[j]
    return w


class BoundaryDefinition:
    """The base's distribution over the next value token where its text may go on inside a longer base token
    (ivl_fast.decode.boundary's rule), written from the rule's text with loops over the whole vocabularies."""

    H, TOP = 3, 64  # the pieces' longest span in base tokens; the extensions kept per piece

    def __init__(self, base_tok, value_tok):
        from ivl_fast.vocab.align import byte_fallback_ids, surface_strings

        self.bs = surface_strings(base_tok)
        fallback_b = byte_fallback_ids(base_tok.get_vocab())
        self.regular = [i for i, x in enumerate(self.bs) if x and i not in fallback_b]
        vs, fallback_v = surface_strings(value_tok), byte_fallback_ids(value_tok.get_vocab())
        self.value_of = {}
        for i, x in enumerate(vs):
            if x and (x not in self.value_of or self.value_of[x] in fallback_v):
                self.value_of[x] = i

    def extensions(self, piece: str) -> list[tuple[int, int]]:
        """(base token extending piece, the value token its remainder starts with: the longest such)."""
        out = []
        for t in self.regular:
            x = self.bs[t]
            if x.startswith(piece) and len(x) > len(piece):
                rest = x[len(piece) :]
                v = next((self.value_of[rest[:k]] for k in range(len(rest), 0, -1) if rest[:k] in self.value_of), None)
                if v is not None:
                    out.append((t, v))
        return out

    def probs(self, logits: torch.Tensor, bids: list[int], w: torch.Tensor) -> torch.Tensor:
        """logits [n, V_base] of the base at every position of its context bids -> p [V_value]."""
        n = len(bids)
        p_after = logits[-1].softmax(-1) @ w
        levels, piece = [], ""
        for j in range(1, min(self.H, n - 1) + 1):
            if not self.bs[bids[-j]]:
                break
            piece = self.bs[bids[-j]] + piece
            ext = self.extensions(piece)
            if ext:
                levels.append((j, ext))
        if not levels:
            return p_after
        h = levels[-1][0]
        lq = [logits[k - 1].log_softmax(-1) for k in range(n - h, n)]  # after the prefixes of lengths n-h .. n-1
        prefix = [0.0]
        for i in range(h):
            prefix.append(prefix[-1] + float(lq[i][bids[n - h + i]]))
        parts = [(prefix[h], None)]
        for j, ext in levels:
            ws = [(prefix[h - j] + float(lq[h - j][t]), v) for t, v in ext]
            parts += sorted(ws, key=lambda x: -x[0])[: self.TOP]
        top = max(x for x, _ in parts)
        p = math.exp(parts[0][0] - top) * p_after
        for x, v in parts[1:]:
            p[v] += math.exp(x - top)
        return p / sum(math.exp(x - top) for x, _ in parts)


def cross_vocab_reference(base, value, vmap, base_tok, value_tok, prompt_ids, n, *, texts=None, eos=(), alpha=1.0):
    """Cross-vocabulary greedy decoding from its definition, one full forward per step and no cache: the text so far
    is the prompt text plus the value tokenizer's reading of the reply (decoded together with the prompt, cut
    after it; where the prompt's ids end inside a character and its text is their decoding, cut before the k
    replacement characters, which the reply may complete); the base reads the base tokenization of that text (one
    BOS); its distribution over the next value token is log(softmax(z_base) @ W) where its text cannot go on inside
    a longer base token, else the mixture of :class:`BoundaryDefinition`; z = that + alpha z_value with float64
    copies of both transformers models; argmax; a row ends at its first EOS.

    Returns per row a dict: "ids" (value ids), "reads" (base ids read at each step), "lp64" (log-probability of
    each chosen token, float64 throughout), "dist64" (each step's whole log-distribution [V_value], float64) and
    "lp32" (the same through the float32 models and a float32 combine: plain torch's own error, the yardstick of the
    tolerance)."""
    w = dense_map(vmap)
    rule = BoundaryDefinition(base_tok, value_tok)
    base64, value64 = copy.deepcopy(base).double(), copy.deepcopy(value).double()
    vb, vv = w.shape
    rows = []
    for r, ids in enumerate(prompt_ids):
        prompt_dec = value_tok.decode(ids, skip_special_tokens=True)
        text0 = prompt_dec if texts is None else texts[r]
        row = {"ids": [], "reads": [], "lp64": [], "lp32": [], "dist64": []}
        gen = row["ids"]
        for _ in range(n):
            full = value_tok.decode(ids + gen, skip_special_tokens=True)
            # a prompt ending inside a character ("\ufffd" * k) whose text is that decoding: the reply completes it
            k = len(prompt_dec) - len(prompt_dec.rstrip("\ufffd"))
            k = k if k and gen and text0.endswith("\ufffd" * k) else 0
            text = text0[: len(text0) - k] + full[len(prompt_dec) - k :]
            bos = base_tok.bos_token
            bids = base_tok(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]
            row["reads"].append(bids)
            bx, vx = torch.tensor([bids]), torch.tensor([ids + gen])
            with torch.no_grad():
                # the base's distribution pushed through W: log(softmax(z_base) @ W), 1e-30 where nothing maps
                p64 = rule.probs(base64(bx).logits[0, :, :vb], bids, w)
                p32 = rule.probs(base(bx).logits[0, :, :vb], bids, w.float())
                z64 = p64.clamp_min(1e-30).log() + alpha * value64(vx).logits[0, -1, :vv]
                z32 = p32.clamp_min(1e-30).log() + alpha * value(vx).logits[0, -1, :vv]
            tok = int(z64.argmax())
            gen.append(tok)
            row["lp64"].append(float(z64.log_softmax(-1)[tok]))
            row["dist64"].append(z64.log_softmax(-1))
            row["lp32"].append(float(z32.log_softmax(-1)[tok].double()))
            if tok in eos:
                break
        rows.append(row)
    return rows
