"""Vocabulary-map building: C++ DTW vs the pure-Python DTW per core, and a full-size map build.

1. ``test_dtw_cpp_vs_python``: the same 120 corpus pieces aligned by both paths on one thread (goal: >= 100x).
2. ``test_full_map_build``: a map between two real tokenizers from ~5 MB of text on all cores (goal for
   32000 x 131072: under a minute on 2 cores). Give the tokenizer dirs with IVL_VOCAB_BASE / IVL_VOCAB_VALUE
   (``bench/mistral_tokenizers.py`` writes mistral-common's tekken_240911 = 131072 byte-level tokens and its
   tokenizer.model.v1 = 32000 SentencePiece tokens); skipped without them. Its peak memory is the build's own:
   the peak RSS is reset just before ``VocabMap.build`` and read just after, against the RSS at the reset.
``IVL_BENCH_OUT=path.json`` writes every figure (DTW: IVL_DTW_RUNS timings of each path, default 5; the map:
IVL_MAP_RUNS builds, default 3) and the provenance.
"""

from __future__ import annotations

import os
import time

import pytest
from conftest import save_results, spread

from ivl_fast._ext import extension_available
from ivl_fast.tiny import corpus_text, train_tokenizer
from ivl_fast.vocab import VocabMap
from ivl_fast.vocab.align import align_counts, surface_strings
from ivl_fast.vocab.build import split_corpus

RESULTS: dict = {}


def _write():
    save_results({"benchmark": "vocabulary-map building", **RESULTS})


def _vm_bytes(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


@pytest.mark.skipif(not extension_available(), reason="ivl_fast._C not built")
def test_dtw_cpp_vs_python(benchmark):
    a, b = train_tokenizer(800, max_chars=100_000), train_tokenizer(2000, max_chars=200_000)
    sa, sb = surface_strings(a), surface_strings(b)
    pieces = split_corpus([corpus_text()[300_000:500_000]])[:400]
    ta = [a(p, add_special_tokens=False)["input_ids"] for p in pieces]
    tb = [b(p, add_special_tokens=False)["input_ids"] for p in pieces]
    t_py, t_cpp, ratios = [], [], []

    def timed(backend: str, **kw):
        t0 = time.perf_counter()
        counts = align_counts(sa, sb, ta, tb, backend=backend, **kw)
        return counts, time.perf_counter() - t0

    def pairs():  # python, C++, python, C++, ...: each ratio from one adjacent pair
        for _ in range(int(os.environ.get("IVL_DTW_RUNS", "5"))):
            py, tp = timed("python")
            cpp, tc = timed("cpp", threads=1)
            assert all((x == y).all() for x, y in zip(py, cpp, strict=True))
            t_py.append(tp)
            t_cpp.append(tc)
            ratios.append(tp / tc)

    benchmark.pedantic(pairs, rounds=1, iterations=1)
    RESULTS["dtw"] = {
        "pieces": len(pieces),
        "python_s": spread(t_py),
        "cpp_1thread_s": spread(t_cpp),
        "speedup": spread(ratios),
    }
    sp = RESULTS["dtw"]["speedup"]
    print(
        f"\nDTW on {len(pieces)} pieces: python {spread(t_py)['median']:.2f} s, C++ (1 thread) "
        f"{spread(t_cpp)['median'] * 1e3:.1f} ms = {sp['median']:.0f}x (range {sp['min']:.0f}-{sp['max']:.0f}x)"
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
    seconds, peaks = [], []

    def builds():  # each build's own peak: RSS high-water mark reset just before it, read just after
        for _ in range(int(os.environ.get("IVL_MAP_RUNS", "3"))):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            before = _vm_bytes("VmRSS")
            t0 = time.perf_counter()
            vmap = VocabMap.build(base, value, corpus, top_k=3)
            seconds.append(time.perf_counter() - t0)
            peaks.append((before, _vm_bytes("VmHWM")))
        return vmap

    vmap = benchmark.pedantic(builds, rounds=1)
    rss_before, build_peak = peaks[0]  # the first build: nothing of an earlier build is still held
    rep = vmap.evaluate(base, value, split_corpus([held]))
    RESULTS["full_map"] = {
        "base_vocab": len(base),
        "value_vocab": len(value),
        "corpus_mb": sum(map(len, corpus)) / 1e6,
        "seconds": spread(seconds),
        "threads": os.cpu_count(),
        "process_rss_before_build_mb": rss_before / 2**20,  # interpreter, torch, both tokenizers, the corpus
        "build_peak_rss_mb": build_peak / 2**20,  # the process's peak during the build
        "build_extra_peak_mb": (build_peak - rss_before) / 2**20,  # what the build itself added at its peak
        "build_extra_peak_mb_each": [(hwm - b) / 2**20 for b, hwm in peaks],
        **vmap.stats,
        "overlap_ratio_held_out": rep["overlap_ratio"],
    }
    print(f"\n{RESULTS['full_map']}")
    _write()
