"""Cutting texts into pieces to align in context (ivl_fast.vocab.segment): where both tokenizations have a token
boundary, so each piece holds the tokens of running text; forced cuts where none is near; lines for a tokenizer
without character offsets."""

from __future__ import annotations

import pytest
import torch

from ivl_fast._ext import extension_available
from ivl_fast.tiny import corpus_text, train_sentencepiece_style_on, train_tokenizer
from ivl_fast.vocab import VocabMap
from ivl_fast.vocab.align import align_counts, align_pieces, surface_strings
from ivl_fast.vocab.build import pieces_of, rank_candidates, split_corpus
from ivl_fast.vocab.segment import Pieces, cut_in_context, encode_with_offsets


@pytest.fixture(scope="module")
def pair():
    """A byte-level BPE base and a SentencePiece-style value tokenizer (dummy prefix "▁", byte fallback), trained on
    different text."""
    text = corpus_text(200_000)
    sp = train_sentencepiece_style_on([text[i : i + 4096] for i in range(100_000, 200_000, 4096)], 900)
    return train_tokenizer(700, max_chars=90_000), sp


@pytest.fixture(scope="module")
def docs():
    t = corpus_text()
    return [t[i : i + 900] for i in range(300_000, 330_000, 900)]


def _spell(surface: list[str], ids: list[int]) -> str:
    return "".join(surface[x] for x in ids).encode("latin-1").decode("utf-8", errors="replace")


def test_pieces_are_running_text_cut_at_common_boundaries(pair, docs):
    """Each text's pieces, put back together, are its whole tokenization on both sides (nothing lost, no token the
    tokenizer would not emit in running text: no dummy prefix at a cut); both sides of every piece spell the same
    characters (the cut is a boundary of both); with max_chars=64 pieces stay under 2 x 64 characters (no forced
    cut); with max_chars=1 (the build's) no piece holds a boundary of both sides inside it."""
    a, b = pair
    sa, sb = surface_strings(a), surface_strings(b)
    enc_a, fa = encode_with_offsets(a, docs)
    enc_b, fb = encode_with_offsets(b, docs)
    assert fa == fb == []
    max_chars = 64
    per_text = []
    for i, d in enumerate(docs):  # one text at a time, to know which pieces belong to it
        p = cut_in_context([enc_a[i]], [enc_b[i]], [len(d)], max_chars=max_chars)
        assert p.forced_cuts == 0
        pa, pb = p.lists()
        assert sum(pa, []) == a(d, add_special_tokens=False)["input_ids"]
        assert sum(pb, []) == b(d, add_special_tokens=False)["input_ids"]
        pos = 0
        for k, (xa, xb) in enumerate(zip(pa, pb, strict=True)):
            span = _spell(sa, xa)
            assert d[pos : pos + len(span)] == span, f"text {i} piece {k}: base side {span!r}"
            vb = _spell(sb, xb)
            want = (" " + span) if k == 0 and not span.startswith(" ") else span  # SentencePiece's dummy prefix
            assert vb == want, f"text {i} piece {k}: value side {vb!r} vs {want!r}"
            assert len(span) < 2 * max_chars
            pos += len(span)
        assert pos == len(d.rstrip("\n")) or pos == len(d)
        per_text.append(len(pa))
        finest = cut_in_context([enc_a[i]], [enc_b[i]], [len(d)])  # max_chars=1: at every common boundary
        fa_, fb_ = finest.lists()
        assert sum(fa_, []) == sum(pa, []) and sum(fb_, []) == sum(pb, []) and len(fa_) > len(pa)
        for k, (xa, xb) in enumerate(zip(fa_, fb_, strict=True)):
            inner_a = {len(_spell(sa, xa[:j])) for j in range(1, len(xa))}
            inner_b = {len(_spell(sb, xb[:j])) - (k == 0) for j in range(1, len(xb))}  # k == 0: the dummy " "
            assert not inner_a & inner_b, f"text {i} piece {k}: a boundary of both inside it"
    assert sum(per_text) > 4 * len(docs)  # the texts were cut, not passed whole
    # all texts at once: the same pieces, in order
    together = cut_in_context(enc_a, enc_b, [len(d) for d in docs], max_chars=max_chars)
    assert len(together) == sum(per_text)


def test_forced_cuts_where_the_tokenizations_share_no_boundary():
    """'xabab...': one side is x|ab|ab|..., the other xa|ba|ba|...|b: they share no boundary but the end. With
    hard_chars the text is still cut (every piece bounded), nothing is lost, and the cuts are counted."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    def bpe(vocab, merges):
        tok = Tokenizer(models.BPE(vocab={k: i for i, k in enumerate(vocab)}, merges=merges, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")

    one = bpe(["<unk>", "x", "a", "b", "ab"], [("a", "b")])
    two = bpe(["<unk>", "x", "a", "b", "xa", "ba"], [("x", "a"), ("b", "a")])
    text = "x" + "ab" * 20
    assert one.convert_ids_to_tokens(one(text, add_special_tokens=False)["input_ids"])[:3] == ["x", "ab", "ab"]
    assert two.convert_ids_to_tokens(two(text, add_special_tokens=False)["input_ids"])[:3] == ["xa", "ba", "ba"]
    e1, _ = encode_with_offsets(one, [text])
    e2, _ = encode_with_offsets(two, [text])
    p = cut_in_context(e1, e2, [len(text)], hard_chars=8)
    assert p.forced_cuts == len(p) - 1 == 5  # cuts at 8, 16, 24, 32, 40 of 41 characters
    l1, l2 = p.lists()
    assert sum(l1, []) == e1[0][0].tolist() and sum(l2, []) == e2[0][0].tolist()
    assert max(map(len, l1)) <= 5 and max(map(len, l2)) <= 5  # <= 8 characters each side
    loose = cut_in_context(e1, e2, [len(text)], hard_chars=100)  # within hard_chars: one piece
    assert len(loose) == 1 and loose.forced_cuts == 0


def test_a_cut_never_falls_inside_a_token():
    """Byte-level BPE can merge the second byte of "é" with the next character: "aéxb" -> a | Ã | ©x | b, offsets
    (1, 2) and (1, 3). Position 2 ends a token but the next one started before it, so it is no boundary of that
    side; a cut there would put half of "é" in one piece and the other half in the next."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<unk>": 0, **{c: i + 1 for i, c in enumerate(alphabet)}, "©x": len(alphabet) + 1}
    raw = Tokenizer(models.BPE(vocab=vocab, merges=[("©", "x")], unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    byte_level = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>")
    chars = Tokenizer(models.BPE(vocab={k: i for i, k in enumerate(["<unk>", "a", "é", "x", "b"])}, merges=[]))
    chars.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    by_char = PreTrainedTokenizerFast(tokenizer_object=chars, unk_token="<unk>")
    text = "aéxb"
    e1, _ = encode_with_offsets(byte_level, [text])
    e2, _ = encode_with_offsets(by_char, [text])
    assert byte_level.convert_ids_to_tokens(e1[0][0].tolist()) == ["a", "Ã", "©x", "b"]
    assert by_char.convert_ids_to_tokens(e2[0][0].tolist()) == ["a", "é", "x", "b"]
    p = cut_in_context(e1, e2, [len(text)])
    s1, s2 = surface_strings(byte_level), surface_strings(by_char)
    spelled = [("".join(s1[x] for x in x1), "".join(s2[y] for y in x2)) for x1, x2 in zip(*p.lists(), strict=True)]
    assert spelled == [("a", "a"), ("\xc3\xa9x", "\xc3\xa9x"), ("b", "b")]  # the bytes of a, éx, b on both sides
    assert p.forced_cuts == 0


def test_pieces_slice_and_lists_round_trip():
    p = Pieces.from_lists([[1, 2], [], [3]], [[4], [5, 6], []])
    assert p.lists() == ([[1, 2], [], [3]], [[4], [5, 6], []])
    assert p.slice(1, 3).lists() == ([[], [3]], [[5, 6], []])
    with pytest.raises(ValueError, match="2 base tokenizations but 1"):
        Pieces.from_lists([[1], [2]], [[3]])
    one = (torch.tensor([1]), torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="max_chars and hard_chars must be >= 1"):
        cut_in_context([one], [one], [1], max_chars=0)
    with pytest.raises(ValueError, match="1 base and 1 value tokenizations for 2 texts"):
        cut_in_context([one], [one], [1, 1])
    empty = (torch.zeros(0, dtype=torch.int64), torch.zeros((0, 2), dtype=torch.int64))
    got = cut_in_context([one, empty], [one, empty], [1, 0])  # a text without tokens: no piece
    assert got.lists() == ([[1]], [[1]])
    assert len(cut_in_context([], [], [])) == 0  # no texts (every one failed to tokenize): no pieces


@pytest.mark.skipif(not extension_available(), reason="ivl_fast._C not built")
def test_cpp_alignment_of_packed_pieces_equals_python(pair, docs):
    a, b = pair
    sa, sb = surface_strings(a), surface_strings(b)
    pieces, _, _ = pieces_of(a, b, docs[:8])
    p1, c1 = align_pieces(sa, sb, pieces, backend="python")
    p2, c2 = align_pieces(sa, sb, pieces, backend="cpp", threads=2)
    assert torch.equal(p1, p2) and torch.equal(c1, c2)
    p3, c3 = align_counts(sa, sb, *pieces.lists(), backend="cpp")
    assert torch.equal(p1, p3) and torch.equal(c1, c3)


def test_a_tokenizer_without_offsets_falls_back_to_lines(pair, docs):
    """transformers' Python tokenizers give no character offsets (ByT5's ignores the flag): the build cuts lines,
    tokenized one by one, and says so."""
    from transformers import ByT5Tokenizer

    a, _ = pair
    byt5 = ByT5Tokenizer()
    pieces, skipped, cut = pieces_of(a, byt5, docs[:6])
    assert cut == "lines" and skipped == [] and len(pieces) == len(split_corpus(docs[:6]))
    vmap = VocabMap.build(a, byt5, docs[:6], top_k=2)
    assert vmap.stats["cut"] == "lines" and vmap.stats["pieces"] == len(pieces)
    rep = vmap.evaluate(a, byt5, docs[6:9])
    assert rep["pieces"] == len(split_corpus(docs[6:9])) and 0.2 < rep["overlap_ratio"] <= 1.0


def test_in_context_pieces_map_running_text_better_than_lines(pair, docs):
    """The reason for cutting in context (issue #19): a map from line pieces, each tokenized alone, learns the
    value side's line-start tokenization (SentencePiece's dummy prefix), which running text does not have. On
    held-out running text the in-context map's argmax maps more tokens than the line-piece map's."""
    a, b = pair
    sa, sb = surface_strings(a), surface_strings(b)
    train, held = docs[:24], docs[24:]
    none = torch.full((len(sa),), -1, dtype=torch.int64)

    def argmax(pieces: Pieces) -> torch.Tensor:
        return rank_candidates(*align_pieces(sa, sb, pieces), none, 1)[3]

    lines = split_corpus(train)
    by_lines = Pieces.from_lists(
        [a(t, add_special_tokens=False)["input_ids"] for t in lines],
        [b(t, add_special_tokens=False)["input_ids"] for t in lines],
    )
    in_context, _, _ = pieces_of(a, b, train)
    from ivl_fast.vocab.build import _overlap

    ha, hb = pieces_of(a, b, held)[0].lists()
    got_context, got_lines = _overlap(argmax(in_context), ha, hb), _overlap(argmax(by_lines), ha, hb)
    assert got_context > got_lines + 0.01, (got_context, got_lines)
