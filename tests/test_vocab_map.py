"""Vocabulary maps: MinED/DTW alignment (C++ extension and Python reference), building, files, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from ivl_fast._ext import extension_available
from ivl_fast.cli import main as cli_main
from ivl_fast.tiny import corpus_text, train_tokenizer
from ivl_fast.vocab import VocabMap
from ivl_fast.vocab.align import align_counts, dtw_align, edit_distance, surface_strings
from ivl_fast.vocab.build import split_corpus

needs_ext = pytest.mark.skipif(not extension_available(), reason="ivl_fast._C not built")


@pytest.fixture(scope="module")
def toks():
    """Two real, different byte-level BPE tokenizers (600 and 1500 tokens) trained on different text."""
    return train_tokenizer(600, max_chars=80_000), train_tokenizer(1500, max_chars=160_000)


@pytest.fixture(scope="module")
def texts():
    t = corpus_text()
    return [t[i : i + 1000] for i in range(200_000, 260_000, 1000)]


def test_edit_distance_and_hand_checked_alignments():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == 3 and edit_distance("é", "e") == 2  # UTF-8 bytes
    # one token split differently: every token is matched, in order
    assert dtw_align(["Hel", "lo", " world"], ["Hello", " wor", "ld"]) == [(0, 0), (1, 1), (2, 2)]
    assert dtw_align([" the", " cat"], [" the", " c", "at"]) == [(0, 0), (1, 1), (1, 2)]
    assert dtw_align(["a"], ["a", "b", "c"]) == [(0, 0), (0, 1), (0, 2)]
    assert dtw_align([], ["a"]) == []


def test_surface_strings_follow_tokenizer_conventions(toks):
    a, _ = toks
    s = surface_strings(a)
    assert s[a.convert_tokens_to_ids("</s>")] == ""  # special tokens have no surface
    ids = a(" the statement", add_special_tokens=False)["input_ids"]
    assert "".join(s[i] for i in ids) == " the statement"  # byte-level "Ġ" turned back into spaces


@needs_ext
def test_cpp_alignment_equals_python_reference(toks, texts):
    a, b = toks
    sa, sb = surface_strings(a), surface_strings(b)
    seqs_a = [a(t[:300], add_special_tokens=False)["input_ids"] for t in texts[:20]]
    seqs_b = [b(t[:300], add_special_tokens=False)["input_ids"] for t in texts[:20]]
    p1, c1 = align_counts(sa, sb, seqs_a, seqs_b, backend="python")
    for threads in (1, 2):
        p2, c2 = align_counts(sa, sb, seqs_a, seqs_b, backend="cpp", threads=threads)
        assert torch.equal(p1, p2) and torch.equal(c1, c2)
    import torch as _t

    assert _t.ops.ivl_fast.edit_distance("kitten", "sitting") == 3


@needs_ext
def test_cpp_alignment_rejects_out_of_range_ids(toks):
    a, b = toks
    with pytest.raises(ValueError, match="outside the base vocabulary"):
        align_counts(surface_strings(a), surface_strings(b), [[0, 10_000]], [[5]], backend="cpp")
    import torch as _t

    ids, off = _t.tensor([1]), _t.tensor([0, 200_000_000])  # offsets past the ids: refused before any read
    with pytest.raises(ValueError, match="must end at the number of ids"):
        _t.ops.ivl_fast.align_counts(["a"] * 5, ["b"] * 5, ids, off, ids, _t.tensor([0, 1]), 2)


def test_partial_utf8_tokens_keep_distinct_surfaces(toks, texts):
    """Byte-level tokens holding parts of one UTF-8 character must not collapse onto one surface."""
    a, b = toks
    s = surface_strings(a)
    high = [x for x in s if x and any(ord(c) > 127 for c in x)]
    assert len(set(high)) == len(high)
    vmap = VocabMap.build(a, b, texts[:40], top_k=3)
    # no value token receives a disproportionate share of base rows
    col_mass = vmap.to_dense().sum(0)
    assert float(col_mass.max()) < 20


def test_build_save_load_evaluate(toks, texts, tmp_path):
    a, b = toks
    vmap = VocabMap.build(a, b, texts[:40], top_k=3)
    d = vmap.to_dense()
    assert d.shape == (len(a), len(b))
    rows = d.sum(1)
    mapped = rows > 0
    assert torch.allclose(rows[mapped], torch.ones(int(mapped.sum())))  # weights sum to 1
    assert int((d > 0).sum(1).max()) <= 3
    assert vmap.stats["coverage"] > 0.9 and vmap.stats["distinct_pairs"] > 0
    # identical strings are preferred: every base token whose string exists in the value vocabulary keeps that
    # value token (the lowest id with the string) in its row, ranked first, whatever its alignment count
    sa, sb = surface_strings(a), surface_strings(b)
    by_s = {}
    for i, s in enumerate(sb):
        if s:
            by_s.setdefault(s, i)
    with_twin = [x for x in range(len(a)) if sa[x] in by_s]
    assert len(with_twin) > 100  # the two real vocabularies share many strings: the check below has teeth
    assert a.convert_tokens_to_ids("Ġthe") in with_twin
    crow, col = vmap.crow.tolist(), vmap.col.tolist()
    for x in with_twin:
        assert crow[x + 1] > crow[x], f"base token {x} ({sa[x]!r}) has an identical value token but no row"
        assert col[crow[x]] == by_s[sa[x]], f"base token {x} ({sa[x]!r}) does not rank its identical string first"
        assert d[x, by_s[sa[x]]] > 0
    assert vmap.ell()[0].shape[0] == len(b)
    p = tmp_path / "m.safetensors"
    vmap.save(p)
    back = VocabMap.load(p, base_tokenizer=a, value_tokenizer=b)
    assert torch.equal(back.to_dense(), d) and back.meta["top_k"] == "3"
    idx, w = back.ell()
    assert torch.equal(idx, vmap.ell()[0]) and torch.equal(w, vmap.ell()[1])
    rep = vmap.evaluate(a, b, texts[40:50])
    assert 0.3 < rep["overlap_ratio"] <= 1.0
    with pytest.raises(ValueError, match="another base tokenizer"):
        VocabMap.load(p, base_tokenizer=b)


def _word_bpe(vocab: dict[str, int], merges: list[tuple[str, str]]):
    """A BPE tokenizer over whitespace-split words with a hand-written vocabulary and merge list (no markers, so
    each token's surface string is the token itself)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


# Value side: whole words "cat", "cab", "cup", "cow" are single tokens ("cup" gets a LOWER id than "cow", so a
# count tie between them is broken by id, not by order of appearance).
HAND_VALUE = _word_bpe(
    {k: i for i, k in enumerate("<unk> c a t o w u p b at ab up ow cat cab cup cow".split())},
    [("a", "t"), ("a", "b"), ("u", "p"), ("o", "w"), ("c", "at"), ("c", "ab"), ("c", "up"), ("c", "ow")],
)
# Base side: never merges the "c", so every word is [c, rest]; "z" has no value counterpart. Ids differ from
# the value side's to catch a mix-up of the two vocabularies.
HAND_BASE = _word_bpe(
    {k: i for i, k in enumerate("<unk> z c a t o w u p b at ab up ow".split())},
    [("a", "t"), ("a", "b"), ("u", "p"), ("o", "w")],
)
# one word per line: a line whose value tokenization is ONE token aligns every base token of it with that token
# (the only monotone path), so the aligned-pair counts below follow from the line counts alone
HAND_LINES = ["cat"] * 3 + ["cup"] * 2 + ["cow"] * 2 + ["cab", "at"]


@pytest.mark.parametrize("backend", ["python", pytest.param("cpp", marks=needs_ext)])
def test_ranking_rule_on_a_hand_made_case(backend):
    """The documented rule, worked out by hand: per base token, candidates ranked by (identical string first,
    aligned count, lower value id), the top K kept, weights = counts / their sum; an identical value token that
    the alignment never paired joins with the row's top count; a token with neither stays unmapped."""
    b, v = HAND_BASE, HAND_VALUE
    bid, vid = b.get_vocab(), v.get_vocab()
    enc = {
        w: (b(w, add_special_tokens=False)["input_ids"], v(w, add_special_tokens=False)["input_ids"])
        for w in ("cat", "cup", "cow", "cab", "at")
    }
    # the tokenizations the hand computation rests on
    assert {
        w: ([b.convert_ids_to_tokens(x) for x in bi], v.convert_ids_to_tokens(vi)) for w, (bi, vi) in enc.items()
    } == {
        "cat": (["c", "at"], ["cat"]),
        "cup": (["c", "up"], ["cup"]),
        "cow": (["c", "ow"], ["cow"]),
        "cab": (["c", "ab"], ["cab"]),
        "at": (["at"], ["at"]),
    }
    # aligned counts: c-cat 3, c-cup 2, c-cow 2, c-cab 1; at-cat 3, at-at 1; up-cup 2; ow-cow 2; ab-cab 1
    expected = {  # base token -> [(value token, weight)] in rank order, for K = 1, 3, 4
        1: {"c": [("c", 1.0)], "at": [("at", 1.0)], "up": [("up", 1.0)], "ow": [("ow", 1.0)], "ab": [("ab", 1.0)]},
        3: {
            "c": [("c", 3 / 8), ("cat", 3 / 8), ("cup", 2 / 8)],  # "c" never paired: joins with the top count 3
            "at": [("at", 1 / 4), ("cat", 3 / 4)],  # identical first although its count is the lower one
            "up": [("up", 1 / 2), ("cup", 1 / 2)],
            "ow": [("ow", 1 / 2), ("cow", 1 / 2)],
            "ab": [("ab", 1 / 2), ("cab", 1 / 2)],
        },
    }
    # K = 4 reaches the id tie-break's loser "cow"; the other rows have at most 2 candidates
    expected[4] = {**expected[3], "c": [("c", 3 / 10), ("cat", 3 / 10), ("cup", 2 / 10), ("cow", 2 / 10)]}
    for k, rows in expected.items():
        rows = dict(rows)
        vmap = VocabMap.build(b, v, ["\n".join(HAND_LINES)], top_k=k, backend=backend)
        assert vmap.shape == (len(bid), len(vid))
        crow, col, val = vmap.crow.tolist(), vmap.col.tolist(), vmap.val.tolist()

        def row(tok, crow=crow, col=col, val=val):
            x = bid[tok]
            return [(v.convert_ids_to_tokens(col[j]), val[j]) for j in range(crow[x], crow[x + 1])]

        for tok in "a t o w u p b".split():  # never seen as base tokens: their identical value token, weight 1
            rows.setdefault(tok, [(tok, 1.0)])
        rows.update({"z": [], "<unk>": []})  # no counterpart, never aligned / special: unmapped
        assert set(rows) == set(bid)
        for tok, want in rows.items():
            got = row(tok)
            assert [t for t, _ in got] == [t for t, _ in want], f"K={k}, base token {tok!r}: {got}"
            assert [w for _, w in got] == pytest.approx([w for _, w in want], abs=1e-7), f"K={k}, {tok!r}: {got}"
        assert vmap.stats == {
            "texts": len(HAND_LINES),
            "skipped_texts": 0,
            "aligned_pairs": 17,  # 3*2 + 2*2 + 2*2 + 2 + 1
            "distinct_pairs": 9,
            "coverage": 12 / 14,
        }


def test_evaluate_map_overlap_on_a_hand_made_case():
    """overlap_ratio = |multiset(top value token of each base token) & multiset(value tokens)| / #value tokens,
    summed over texts; the top value token is the row's largest weight, the first in rank order on a tie."""
    vmap = VocabMap.build(HAND_BASE, HAND_VALUE, ["\n".join(HAND_LINES)], top_k=3)
    # by hand (rows as in the test above): top(c) = c (3/8 ties cat: first), top(at) = cat (3/4), top(up) = up,
    # top(ow) = ow. "cat cup": base c at c up -> {c, cat, c, up} vs value {cat, cup}: 1 of 2.
    # "at": base at -> {cat} vs {at}: 0 of 1. "ow": {ow} vs {ow}: 1 of 1. Overlap (1 + 0 + 1) / (2 + 1 + 1).
    rep = vmap.evaluate(HAND_BASE, HAND_VALUE, ["cat cup", "at", "ow"])
    assert rep == {"overlap_ratio": 0.5, "coverage": 12 / 14, "texts": 3}
    assert vmap.evaluate(HAND_BASE, HAND_VALUE, ["at at"])["overlap_ratio"] == 0.0
    assert vmap.evaluate(HAND_BASE, HAND_VALUE, ["cow ow up"])["overlap_ratio"] == pytest.approx(2 / 3)


def test_bad_input(toks, texts, tmp_path):
    a, b = toks
    with pytest.raises(ValueError, match="top_k must be"):
        VocabMap.build(a, b, texts[:2], top_k=0)
    with pytest.raises(ValueError, match="corpus is empty"):
        VocabMap.build(a, b, ["", "   "])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        VocabMap.load(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not an ivl-fast vocabulary map"):
        VocabMap.load(tmp_path / "other.safetensors")

    class NoVocab:
        def get_vocab(self):
            return {}

    with pytest.raises(ValueError, match="empty vocabulary"):
        VocabMap.build(NoVocab(), b, texts[:2])

    class Flaky:  # a tokenizer that cannot encode some texts: counted and skipped, never a crash
        def __init__(self, tok):
            self.tok = tok

        def __call__(self, text, **kw):
            if "class" in text:
                raise ValueError("cannot encode")
            return self.tok(text, **kw)

        def __getattr__(self, name):
            return getattr(self.tok, name)

        def __len__(self):
            return len(self.tok)

    vm = VocabMap.build(Flaky(a), b, texts[:10])
    assert vm.stats["skipped_texts"] > 0


def test_cli_vocab_map(toks, texts, tmp_path, capsys):
    a, b = toks
    a.save_pretrained(tmp_path / "ta")
    b.save_pretrained(tmp_path / "tb")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(texts[:30]))
    out = tmp_path / "map.safetensors"
    rc = cli_main(
        ["vocab-map", "--base-tokenizer", str(tmp_path / "ta"), "--value-tokenizer", str(tmp_path / "tb")]
        + ["--corpus", str(corpus), "--out", str(out), "--top-k", "2", "--evaluate"]
    )
    assert rc == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["shape"] == [len(a), len(b)] and 0 < rep["evaluation"]["overlap_ratio"] <= 1
    assert VocabMap.load(out, base_tokenizer=a, value_tokenizer=b).meta["top_k"] == "2"
    rc = cli_main(
        ["vocab-map", "--base-tokenizer", str(tmp_path / "ta"), "--value-tokenizer", str(tmp_path / "tb")]
        + ["--corpus", str(tmp_path / "nope.txt"), "--out", str(out)]
    )
    assert rc == 2 and "does not exist" in capsys.readouterr().err


def test_split_corpus_cuts_long_lines_at_a_late_space_else_hard():
    """Lines of <= max_chars pass whole (blank ones dropped); a longer line is cut at its last space before
    max_chars if that lies past max_chars // 2, else hard at max_chars; the space starts the next piece (where a
    byte-level tokenizer keeps it with its word). Expected pieces worked out by hand for max_chars = 10."""
    texts = [
        "alpha beta gamma delta\nshort line\n\n   \nabcdefghijklmnopqrstuvwxyz0123",
        "one two three four five six\r\nx",
    ]
    assert split_corpus(texts, max_chars=10) == [
        "alpha beta",  # the only space before 10 is at 5, not past 10 // 2: hard cut at 10
        " gamma",  # space at 6
        " delta",
        "short line",  # exactly 10: whole
        "abcdefghij",  # no space at all: hard cuts
        "klmnopqrst",
        "uvwxyz0123",
        "one two",  # space at 7
        " three",
        " four five",  # space at 5 only: hard cut at 10
        " six",
        "x",  # \r\n is a line break too
    ]
    # a run of spaces longer than max_chars // 2: the blank piece between the words is dropped, the text kept
    assert split_corpus(["a" + " " * 20 + "b"], max_chars=10) == ["a" + " " * 8, "   b"]
