"""alpha at launch (``--hf-overrides '{"ivl_alpha": ...}'``): at 0 the served pair is vLLM serving the base alone,
token for token and log-probability for log-probability. Two engines, one after the other."""

from __future__ import annotations

import json

import pytest
from vllm_fixtures import PROMPTS, greedy, sampled_logprobs, start_llm, stop_llm

from ivl_fast.tiny import make_tiny_pair
from ivl_fast.vllm import export_pair


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(exported dir, base alone's outputs, the pair's outputs at alpha 0 set at launch) on PROMPTS, 64 tokens."""
    d = tmp_path_factory.mktemp("vllm_alpha")
    paths = make_tiny_pair(d / "ckpt", vocab_size=512, seed=3)
    out = export_pair(paths["base"], paths["value"], d / "pair", alpha=1.0)
    llm = start_llm(paths["base"])
    alone = llm.generate(PROMPTS, greedy(64))
    stop_llm(llm)
    llm = start_llm(out, hf_overrides={"ivl_alpha": 0.0})
    pair_at_zero = llm.generate(PROMPTS, greedy(64))
    stop_llm(llm)
    return out, alone, pair_at_zero


def test_alpha_zero_is_the_base_alone(runs):
    out, alone, pair_at_zero = runs
    assert json.loads((out / "config.json").read_text())["ivl_alpha"] == 1.0  # the override, not the file, counted
    for a, p in zip(alone, pair_at_zero, strict=True):
        assert list(p.outputs[0].token_ids) == list(a.outputs[0].token_ids)
        lp_a, lp_p = sampled_logprobs(a.outputs[0]), sampled_logprobs(p.outputs[0])
        assert max(abs(x - y) for x, y in zip(lp_a, lp_p, strict=True)) < 1e-5
