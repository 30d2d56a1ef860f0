"""Vocabulary-map building: C++ DTW vs the pure-Python DTW per core, and a full-size map build.

1. ``test_dtw_cpp_vs_python``: the same 120 corpus pieces aligned by both paths on one thread (goal: >= 100x).
2. ``test_full_map_build``: a map between two real tokenizers from ~5 MB of text on all cores (goal for
   32000 x 131072: under a minute on 2 cores). Give the tokenizer dirs with IVL_VOCAB_BASE / IVL_VOCAB_VALUE
   (e.g. mistral-common's tekken_240911.json converted with transformers' convert_tekken_tokenizer = 131072
   byte-level tokens, and its tokenizer.model.v1 = 32000 SentencePiece tokens); skipped without them.
``IVL_BENCH_OUT=path.json`` writes every figure.
"""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path

import pytest

from ivl_fast._ext import extension_available
from ivl_fast.tiny import corpus_text, train_tokenizer
from ivl_fast.vocab import VocabMap
from ivl_fast.vocab.align import align_counts, surface_strings
from ivl_fast.vocab.build import split_corpus

RESULTS: dict = {}


def _write():
    if os.environ.get("IVL_BENCH_OUT"):
        import torch

        RESULTS.update({"torch": torch.__version__, "cpu_count": os.cpu_count(), "device": "cpu"})
        RESULTS["command"] = (
            "IVL_VOCAB_BASE=<tekken_240911 converted dir> IVL_VOCAB_VALUE=<tokenizer.model.v1 dir> "
            "IVL_BENCH_OUT=bench/results/vocab_map_cpu.json pytest bench/test_vocab_map.py -s"
        )
        Path(os.environ["IVL_BENCH_OUT"]).write_text(json.dumps(RESULTS, indent=2))


@pytest.mark.skipif(not extension_available(), reason="ivl_fast._C not built")
def test_dtw_cpp_vs_python(benchmark):
    a, b = train_tokenizer(800, max_chars=100_000), train_tokenizer(2000, max_chars=200_000)
    sa, sb = surface_strings(a), surface_strings(b)
    pieces = split_corpus([corpus_text()[300_000:500_000]])[:400]
    ta = [a(p, add_special_tokens=False)["input_ids"] for p in pieces]
    tb = [b(p, add_special_tokens=False)["input_ids"] for p in pieces]
    t0 = time.perf_counter()
    py = align_counts(sa, sb, ta, tb, backend="python")
    t_py = time.perf_counter() - t0
    t0 = time.perf_counter()
    cpp = benchmark.pedantic(lambda: align_counts(sa, sb, ta, tb, backend="cpp", threads=1), rounds=3)
    t_cpp = min(benchmark.stats.stats.data)
    assert all((x == y).all() for x, y in zip(py, cpp, strict=True))
    RESULTS["dtw"] = {"pieces": len(pieces), "python_s": t_py, "cpp_1thread_s": t_cpp, "speedup": t_py / t_cpp}
    print(
        f"\nDTW on {len(pieces)} pieces: python {t_py:.2f} s, C++ (1 thread) {t_cpp * 1e3:.1f} ms = {t_py / t_cpp:.0f}x"
    )
    _write()


@pytest.mark.skipif(
    not (os.environ.get("IVL_VOCAB_BASE") and os.environ.get("IVL_VOCAB_VALUE")),
    reason="set IVL_VOCAB_BASE and IVL_VOCAB_VALUE to tokenizer dirs",
)
def test_full_map_build(benchmark):
    from ivl_fast.chat import load_tokenizer

    base, value = load_tokenizer(os.environ["IVL_VOCAB_BASE"]), load_tokenizer(os.environ["IVL_VOCAB_VALUE"])
    text = corpus_text()
    cut = int(len(text) * 0.9)
    train, held = text[:cut], text[cut:]
    mb = float(os.environ.get("IVL_VOCAB_MB", "5"))
    reps = max(1, round(mb * 1e6 / len(train)))
    corpus = [train] * reps  # pydoc is ~0.75 MB: repeated to the asked size (same alignments, real cost)
    t0 = time.perf_counter()
    vmap = benchmark.pedantic(lambda: VocabMap.build(base, value, corpus, top_k=3), rounds=1)
    secs = time.perf_counter() - t0
    rep = vmap.evaluate(base, value, split_corpus([held]))
    RESULTS["full_map"] = {
        "base_vocab": len(base),
        "value_vocab": len(value),
        "corpus_mb": sum(map(len, corpus)) / 1e6,
        "seconds": secs,
        "threads": os.cpu_count(),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **vmap.stats,
        "overlap_ratio_held_out": rep["overlap_ratio"],
    }
    print(f"\n{RESULTS['full_map']}")
    _write()
