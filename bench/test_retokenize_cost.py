"""The host's work per cross-vocabulary decode step against the context's length: ``Retokenizer.advance`` (decode the
value's tokens, re-tokenize the whole text for the base, compare with what it read) for one row, prompts of 32 to
8192 value tokens of English text, 64 steps of a real continuation.

Floor of the rule (the base reads its canonical tokenization of the whole text, exactly, every step): one encode
of the whole text by the base tokenizer, measured beside it (``encode_ms``): advance costs that plus the value
decode of the reply and the comparison. Both grow linearly with the context; on a GPU this host work adds to each
step's time unless the device step is longer. Pairs: the demo-size BPEs (512 -> 700 tokens, always) and
mistral-common's tekken_240911 -> tokenizer_v1 (131072 -> 32000) when IVL_TEST_TOKENIZERS holds them
(bench/mistral_tokenizers.py). ``IVL_BENCH_OUT=path.json`` writes every figure (medians of 5 passes of 64 steps).
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import pytest
from conftest import save_results, spread

from ivl_fast.decode.cross_vocab import Retokenizer
from ivl_fast.tiny import corpus_text, train_tokenizer

ROWS: list[dict] = []
LENGTHS = [32, 512, 2048, 8192]


def _pairs() -> dict:
    pairs = {"demo-size BPE 512 -> 700": (train_tokenizer(512), train_tokenizer(700, max_chars=150_000))}
    root = os.environ.get("IVL_TEST_TOKENIZERS")
    if root and (Path(root) / "tokenizer_v1").is_dir():
        from ivl_fast.chat import load_tokenizer

        value, base = load_tokenizer(Path(root) / "tekken_240911"), load_tokenizer(Path(root) / "tokenizer_v1")
        pairs["tekken_240911 -> tokenizer_v1"] = (value, base)
    return pairs


PAIRS = _pairs()


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("pair", list(PAIRS))
def test_advance_cost_per_step(pair, length, benchmark):
    value, base = PAIRS[pair]
    text = corpus_text(500_000)[100_000:]
    ids = value(text, add_special_tokens=False)["input_ids"][:length]
    prompt = value.decode(ids)
    cont = value(text[len(prompt) : len(prompt) + 2000], add_special_tokens=False)["input_ids"][:64]
    advance, encode = [], []

    def passes():  # 5 passes of 64 steps, each beside as many whole-text encodes (what pytest-benchmark times)
        for _ in range(5):
            rt = Retokenizer(value, base, [ids], [prompt], False, 10**6)
            t0 = time.perf_counter()
            for t in cont:
                rt.advance([t], [False])
            advance.append((time.perf_counter() - t0) / len(cont) * 1e3)
            whole = rt.text(0)
            t0 = time.perf_counter()
            for _ in cont:
                base(whole, add_special_tokens=True)
            encode.append((time.perf_counter() - t0) / len(cont) * 1e3)
        return rt

    rt = benchmark.pedantic(passes, rounds=1, iterations=1)
    row = {
        "pair": pair,
        "prompt_value_tokens": length,
        "base_tokens_at_end": len(rt.base_ctx[0]),
        "steps": len(cont),
        "advance_ms": spread(advance),
        "encode_ms": spread(encode),
        "advance_over_encode": statistics.median(advance) / statistics.median(encode),
    }
    ROWS.append(row)
    save_results({"benchmark": "cross-vocabulary re-tokenization per step", "rows": ROWS})
    print(
        f"\n{pair}, prompt {length}: advance {row['advance_ms']['median']:.3f} ms/step, whole-text encode "
        f"{row['encode_ms']['median']:.3f} ms ({row['advance_over_encode']:.2f}x)"
    )
