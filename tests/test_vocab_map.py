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
    # identical strings are preferred: a base token whose string exists in the value vocab maps there first
    sa, sb = surface_strings(a), surface_strings(b)
    by_s = {s: i for i, s in enumerate(sb) if s}
    the = a.convert_tokens_to_ids("Ġthe")
    assert vmap.ell()[0].shape[0] == len(b)
    assert int(d[the].argmax()) == by_s[sa[the]] or d[the, by_s[sa[the]]] > 0
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
