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
from ivl_fast.vocab.build import pieces_of, split_corpus

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
    # the ranking rule, against the alignment counts recomputed here (the pieces as the build cuts them, tested in
    # tests/test_vocab_segment.py; the pure-Python DTW): each seen base token keeps its value tokens by count (ties:
    # the nearer surface by edit distance, the identical surface, then the lower id), top 3, weights = counts over
    # the kept ones; a base token never aligned gets the value token of its surface (a regular one before a
    # byte-fallback one), weight 1
    sa, sb = surface_strings(a), surface_strings(b)
    pieces, skipped, cut = pieces_of(a, b, texts[:40])
    assert (skipped, cut, vmap.stats["pieces"]) == ([], "in context", len(pieces))
    pairs, counts = align_counts(sa, sb, *pieces.lists(), backend="python")
    by_row: dict[int, list[tuple[int, int]]] = {}
    for (x, y), c in zip(pairs.tolist(), counts.tolist(), strict=True):
        by_row.setdefault(x, []).append((y, c))
    fallback = {i for t, i in b.get_vocab().items() if t.startswith("<0x") and len(t) == 6}
    twin = {}
    for i, t in enumerate(sb):
        if t and (t not in twin or (twin[t] in fallback and i not in fallback)):
            twin[t] = i
    from ivl_fast.vocab.build import special_pairs

    roles = dict(special_pairs(a, b))
    assert roles[a.eos_token_id] == b.eos_token_id
    crow, col, val = vmap.crow.tolist(), vmap.col.tolist(), vmap.val.tolist()
    ties = 0
    for x in range(len(a)):
        got = [(col[j], val[j]) for j in range(crow[x], crow[x + 1])]
        if x in by_row:
            same = twin.get(sa[x]) if sa[x] else None
            ranked = sorted(by_row[x], key=lambda yc: (-yc[1], edit_distance(sa[x], sb[yc[0]]), yc[0] != same, yc[0]))[
                :3
            ]
            ties += len(ranked) > 1 and ranked[0][1] == ranked[1][1]
            total = sum(c for _, c in ranked)
            assert [y for y, _ in got] == [y for y, _ in ranked], f"base token {x} ({sa[x]!r})"
            assert [w for _, w in got] == pytest.approx([c / total for _, c in ranked])
            assert int(vmap.argmax[x]) == max(by_row[x], key=lambda yc: (yc[1], -yc[0]))[0]
        elif x in roles:  # a special token: the value's token of the same role (EOS -> EOS)
            assert got == [(roles[x], 1.0)] and int(vmap.argmax[x]) == -1
        elif sa[x] and sa[x] in twin:
            assert got == [(twin[sa[x]], 1.0)], f"unseen base token {x} ({sa[x]!r})"
            assert int(vmap.argmax[x]) == -1
        else:
            assert got == [] and int(vmap.argmax[x]) == -1
    assert ties > 10  # count ties happen: the tie-break is exercised
    assert vmap.ell()[0].shape[0] == len(b)
    p = tmp_path / "m.safetensors"
    vmap.save(p)
    back = VocabMap.load(p, base_tokenizer=a, value_tokenizer=b)
    assert torch.equal(back.to_dense(), d) and back.meta["top_k"] == "3"
    assert torch.equal(back.argmax, vmap.argmax)  # the authors' argmax baseline travels with the file
    idx, w = back.ell()
    assert torch.equal(idx, vmap.ell()[0]) and torch.equal(w, vmap.ell()[1])
    rep = vmap.evaluate(a, b, texts[40:50])
    assert 0.3 < rep["overlap_ratio"] <= 1.0 and 0 < rep["overlap_ratio_weighted"] <= 1.0
    base = rep["argmax_baseline"]
    assert 0.3 < base["overlap_ratio"] <= rep["overlap_ratio"] and base["coverage"] < rep["coverage"]
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
# one word per text (each shorter than a piece, so one piece each): a text whose value tokenization is ONE token
# aligns every base token of it with that token (the only monotone path), so the aligned-pair counts below follow
# from the text counts alone
HAND_LINES = ["cat"] * 3 + ["cup"] * 2 + ["cow"] * 2 + ["cab", "at"]


@pytest.mark.parametrize("backend", ["python", pytest.param("cpp", marks=needs_ext)])
def test_ranking_rule_on_a_hand_made_case(backend):
    """The documented rule, worked out by hand: per base token, candidates ranked by (aligned count, identical
    string, lower value id), the top K kept, weights = counts / their sum; a base token the alignment never saw
    maps to its identical value token (weight 1), a special token to the value's of its role; any other stays
    unmapped."""
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
    expected = {  # base token -> [(value token, weight)] in rank order (by count; "cup" < "cow" by id), K = 1, 3, 4
        1: {
            "c": [("cat", 1.0)],
            "at": [("cat", 1.0)],
            "up": [("cup", 1.0)],
            "ow": [("cow", 1.0)],
            "ab": [("cab", 1.0)],
        },
        3: {
            "c": [("cat", 3 / 7), ("cup", 2 / 7), ("cow", 2 / 7)],  # "c" was aligned: its identical twin is not added
            "at": [("cat", 3 / 4), ("at", 1 / 4)],  # the count decides, not the identical string
            "up": [("cup", 1.0)],
            "ow": [("cow", 1.0)],
            "ab": [("cab", 1.0)],
        },
    }
    expected[4] = {**expected[3], "c": [("cat", 3 / 8), ("cup", 2 / 8), ("cow", 2 / 8), ("cab", 1 / 8)]}
    for k, rows in expected.items():
        rows = dict(rows)
        vmap = VocabMap.build(b, v, HAND_LINES, top_k=k, backend=backend)
        assert vmap.shape == (len(bid), len(vid))
        crow, col, val = vmap.crow.tolist(), vmap.col.tolist(), vmap.val.tolist()

        def row(tok, crow=crow, col=col, val=val):
            x = bid[tok]
            return [(v.convert_ids_to_tokens(col[j]), val[j]) for j in range(crow[x], crow[x + 1])]

        for tok in "a t o w u p b".split():  # never seen as base tokens: their identical value token, weight 1
            rows.setdefault(tok, [(tok, 1.0)])
        rows.update({"z": [], "<unk>": [("<unk>", 1.0)]})  # no counterpart: unmapped; special: by its role
        assert set(rows) == set(bid)
        for tok, want in rows.items():
            got = row(tok)
            assert [t for t, _ in got] == [t for t, _ in want], f"K={k}, base token {tok!r}: {got}"
            assert [w for _, w in got] == pytest.approx([w for _, w in want], abs=1e-7), f"K={k}, {tok!r}: {got}"
        assert set(vmap.stats.pop("seconds")) == {"surfaces", "tokenize", "align", "rank", "hash"}
        assert vmap.stats == {
            "texts": len(HAND_LINES),
            "cut": "in context",
            "pieces": len(HAND_LINES),  # each text shorter than a piece: one piece each
            "forced_cuts": 0,
            "skipped_texts": 0,
            "aligned_pairs": 17,  # 3*2 + 2*2 + 2*2 + 2 + 1
            "distinct_pairs": 9,
            "coverage": 13 / 14,
            "aligned_base_tokens": 5,  # c, at, up, ow, ab
        }
        # the authors' argmax: the most aligned value token (ties to the lower id), nothing for the others
        assert {
            b.convert_ids_to_tokens(x): v.convert_ids_to_tokens(int(y)) for x, y in enumerate(vmap.argmax) if y >= 0
        } == {"c": "cat", "at": "cat", "up": "cup", "ow": "cow", "ab": "cab"}


def test_rank_candidates_ties_and_identical_surfaces():
    """The ranking of rank_candidates on pairs given by hand, and identical_ids' preference of a regular token over
    a byte-fallback one of the same surface (SentencePiece's "<0x2E>" and "." are both ".")."""
    from ivl_fast.vocab.build import identical_ids, rank_candidates

    # value vocab: 0 "<0x2E>" (byte fallback), 1 ".", 2 "a", 3 "b", 4 "ab"; base vocab: 0 ".", 1 "ab", 2 "b", 3 "zz"
    same = identical_ids([".", "ab", "b", "zz"], [".", ".", "a", "b", "ab"], {0})
    assert same.tolist() == [1, 4, 3, -1]
    # base 0: value 0 x2, value 1 x2 (a tie: the identical surface, the regular ".", wins); base 1: "a" x3, "ab"
    # x1, "b" x1 (count first; "b" < "ab" by id breaks nothing: "ab" is identical and wins the tie with "b");
    # base 2 and 3: never aligned ("b" gets its twin, "zz" nothing)
    pairs = torch.tensor([[0, 0], [0, 1], [1, 2], [1, 3], [1, 4]])
    counts = torch.tensor([2, 2, 3, 1, 1])
    crow, col, val, argmax = rank_candidates(pairs, counts, same, top_k=2)
    rows = [
        list(zip(col[crow[i] : crow[i + 1]].tolist(), val[crow[i] : crow[i + 1]].tolist(), strict=True))
        for i in range(4)
    ]
    assert rows == [
        [(1, 0.5), (0, 0.5)],
        [(2, 0.75), (4, 0.25)],
        [(3, 1.0)],
        [],
    ]
    assert argmax.tolist() == [0, 2, -1, -1]  # the authors' argmax: count, then the lower id; no twins
    # the edit-distance tie-break: base " re" aligned once with value " " (id 0) and once with "re" (id 1), as
    # SentencePiece's "▁re" against byte-level "Ġ" "re"; "re" is nearer (1 edit against 2), so it leads the row
    from ivl_fast.vocab.build import pair_distances

    pairs = torch.tensor([[0, 0], [0, 1]])
    counts = torch.tensor([1, 1])
    dist = pair_distances(pairs, [" re"], [" ", "re"])
    assert dist.tolist() == [2, 1]
    none = torch.tensor([-1])
    assert rank_candidates(pairs, counts, none, 2, dist)[1].tolist() == [1, 0]
    assert rank_candidates(pairs, counts, none, 2)[1].tolist() == [0, 1]  # without distances: the lower id
    assert rank_candidates(pairs, counts, none, 1, dist)[3].tolist() == [0]  # the authors' argmax: unchanged


def test_evaluate_map_overlap_on_a_hand_made_case():
    """overlap_ratio = |multiset(top value token of each base token) & multiset(value tokens)| / #value tokens,
    summed over texts; overlap_ratio_weighted: each base token spread over its row by the weights, each value
    token's mass capped at its own count; argmax_baseline: the same overlap for the argmax map of the counts."""
    vmap = VocabMap.build(HAND_BASE, HAND_VALUE, HAND_LINES, top_k=3)
    # by hand (rows as in the test above): top(c) = cat, top(at) = cat, top(up) = cup, top(ow) = cow.
    # "cat cup": base c at c up -> {cat, cat, cat, cup} vs value {cat, cup}: 2 of 2. "at": {cat} vs {at}: 0 of 1.
    # "ow": {cow} vs {ow}: 0 of 1. Overlap (2 + 0 + 0) / (2 + 1 + 1).
    # Weighted: "cat cup": mass cat 2 * 3/7 + 3/4, cup 2 * 2/7 + 1 (both >= 1): 2; "at": at 1/4; "ow": 0 -> 2.25 / 4.
    rep = vmap.evaluate(HAND_BASE, HAND_VALUE, ["cat cup", "at", "ow"])
    assert rep == {
        "overlap_ratio": 0.5,
        "overlap_ratio_weighted": pytest.approx(2.25 / 4),
        "coverage": 13 / 14,
        "texts": 3,
        "pieces": 3,
        "skipped_texts": 0,
        "argmax_baseline": {"overlap_ratio": 0.5, "coverage": 5 / 14},  # the same tops; only 5 base tokens mapped
    }
    assert vmap.evaluate(HAND_BASE, HAND_VALUE, ["at at"])["overlap_ratio"] == 0.0
    # "cow ow up": base c ow ow up -> {cat, cow, cow, cup} vs {cow, ow, up}: 1 of 3
    assert vmap.evaluate(HAND_BASE, HAND_VALUE, ["cow ow up"])["overlap_ratio"] == pytest.approx(1 / 3)
    plain = VocabMap(vmap.crow, vmap.col, vmap.val, vmap.shape)  # a map without the baseline: reported as None
    assert plain.evaluate(HAND_BASE, HAND_VALUE, ["at"])["argmax_baseline"] is None


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
    cap = capsys.readouterr()
    rep = json.loads(cap.out)
    ev = rep["evaluation"]
    assert rep["shape"] == [len(a), len(b)] and set(ev) == {
        "held_out_texts",
        "held_out_pieces",
        "map",
        "argmax_baseline",
    }
    assert 0 < ev["argmax_baseline"]["overlap_ratio"] <= ev["map"]["overlap_ratio"] <= 1
    assert ev["argmax_baseline"]["coverage"] < ev["map"]["coverage"]
    # the same figures, side by side, on stderr
    lines = cap.err.strip().splitlines()[-3:]
    assert lines[1].split() == [
        "map",
        *(f"{ev['map'][k]:.3f}" for k in ("overlap_ratio", "overlap_ratio_weighted", "coverage")),
    ]
    bl = ev["argmax_baseline"]
    assert lines[2].split() == ["argmax", "baseline", f"{bl['overlap_ratio']:.3f}", "-", f"{bl['coverage']:.3f}"]
    assert VocabMap.load(out, base_tokenizer=a, value_tokenizer=b).meta["top_k"] == "2"
    # evaluating the saved map: its argmax baseline came with the file
    rc = cli_main(
        ["vocab-map", "--base-tokenizer", str(tmp_path / "ta"), "--value-tokenizer", str(tmp_path / "tb")]
        + ["--corpus", str(corpus), "--map", str(out)]
    )
    assert rc == 0 and json.loads(capsys.readouterr().out)["evaluation"]["argmax_baseline"] is not None
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


def test_push_forward_and_its_ell_layout_on_a_hand_made_map():
    """W [4 base, 3 value]: value 0 <- base 0; value 1 <- base 1 and 2 (0.5 each); value 2 <- nothing.
    apply() is log(max(softmax(z) @ W, 1e-30)) in the logits' precision (fp32, or fp64 for fp64), for a batch
    [B, V_base] or one row [V_base]; ell() groups W by value token (K = the most base tokens of any value token,
    base ids ascending), cached per device."""
    w = torch.tensor([[1.0, 0, 0], [0, 0.5, 0], [0, 0.5, 0], [0, 0, 0]])
    vmap = VocabMap.from_dense(w)
    z = torch.tensor([[0.5, -1.0, 2.0, 0.25], [3.0, 0.0, -2.0, 1.0]])
    want = torch.log((torch.softmax(z.double(), -1) @ w.double()).clamp_min(1e-30))
    got = vmap.apply(z)
    assert got.dtype == torch.float32 and vmap.apply(z.double()).dtype == torch.float64
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=0)
    torch.testing.assert_close(vmap.apply(z.double()), want, atol=1e-12, rtol=0)
    torch.testing.assert_close(vmap.apply(z[1]), got[1])  # one row
    for bad in (torch.zeros(3, 7), torch.zeros(7)):
        with pytest.raises(ValueError, match="^base logits have 7 entries but the map expects 4$"):
            vmap.apply(bad)
    # its operand is made once (first under inference mode, as decoding calls it), and a later call still carries
    # gradients back to the logits: d/dz of sum(apply(z)) against the float64 product's
    fresh = VocabMap.from_dense(w)
    with torch.inference_mode():
        fresh.apply(z.double())
    zg = z.double().clone().requires_grad_(True)
    fresh.apply(zg).sum().backward()
    zw = z.double().clone().requires_grad_(True)
    torch.log((torch.softmax(zw, -1) @ w.double()).clamp_min(1e-30)).sum().backward()
    torch.testing.assert_close(zg.grad, zw.grad, atol=1e-12, rtol=0)
    idx, wk = vmap.ell()
    assert idx.tolist() == [[0, 0], [1, 2], [0, 0]] and wk.tolist() == [[1.0, 0.0], [0.5, 0.5], [0.0, 0.0]]
    assert VocabMap.from_dense(torch.eye(3)).ell()[0].shape == (3, 1)  # one base token per value token: K = 1
    on_meta = vmap.ell("meta")
    assert on_meta[0].device.type == "meta" and vmap.ell()[0].device.type == "cpu"
