"""The pair over two tensor-parallel ranks (vLLM shards the base and the value network alike): greedy tokens equal
to FastIVLDecoder's on one process. vLLM's CPU backend binds each rank's threads to cores
(``VLLM_CPU_OMP_THREADS_BIND``: one core each here)."""

from __future__ import annotations

import os

import pytest
from vllm_fixtures import PROMPTS, greedy, reference, sampled_logprobs, start_llm, stop_llm

from ivl_fast import FastIVLDecoder
from ivl_fast.tiny import make_tiny_pair
from ivl_fast.vllm import export_pair

pytestmark = pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="two tensor-parallel ranks need two cores")


@pytest.fixture(scope="module")
def tp2(tmp_path_factory):
    d = tmp_path_factory.mktemp("vllm_tp")
    paths = make_tiny_pair(d / "ckpt", vocab_size=512, seed=0)  # base 8 heads / 4 KV, value 4 / 2: both split
    out = export_pair(paths["base"], paths["value"], d / "pair")
    mp = pytest.MonkeyPatch()
    mp.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # the workers read it when they start
    try:
        llm = start_llm(out, tensor_parallel_size=2)
    finally:
        mp.undo()
    yield paths, llm
    stop_llm(llm)


def test_two_ranks_equal_fast_ivl_decoder(tp2):
    paths, llm = tp2
    tok = llm.get_tokenizer()
    outs = llm.generate(PROMPTS, greedy(64))
    dec = FastIVLDecoder.from_pretrained(paths["base"], paths["value"])
    for prompt, out in zip(PROMPTS, outs, strict=True):
        want, want_lp = reference(dec, tok(prompt).input_ids, 64)
        assert list(out.outputs[0].token_ids) == want, prompt
        lp = sampled_logprobs(out.outputs[0])
        assert max(abs(a - b) for a, b in zip(lp, want_lp, strict=True)) < 1e-4
