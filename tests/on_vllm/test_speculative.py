"""vLLM's own draft-model speculative decoding with the pair as the target: a small plain base drafts, the pair
verifies, so the output is the pair's (greedy: token for token FastIVLDecoder's). A pair as the draft is refused
by name (vLLM's draft proposer keeps one hidden-state buffer of the draft config's width)."""

from __future__ import annotations

import pytest
from vllm_fixtures import PROMPTS, greedy, reference, start_llm, stop_llm

from ivl_fast import FastIVLDecoder
from ivl_fast.chat import load_tokenizer
from ivl_fast.tiny import llama_config, make_tiny_pair, save_random_model
from ivl_fast.vllm import export_pair


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("vllm_spec")
    paths = make_tiny_pair(d / "ckpt", vocab_size=512, seed=0)
    tok = load_tokenizer(paths["base"])
    small = llama_config(len(tok), hidden=128, layers=2, heads=4, kv_heads=2)
    paths["small_base"] = save_random_model(small, d / "small_base", seed=7, tokenizer=tok)
    paths["pair"] = export_pair(paths["base"], paths["value"], d / "pair")
    paths["small_pair"] = export_pair(paths["small_base"], paths["value"], d / "small_pair")
    return paths


def test_small_base_drafts_for_the_pair(checkpoints):
    spec = {"method": "draft_model", "model": str(checkpoints["small_base"]), "num_speculative_tokens": 3}
    llm = start_llm(checkpoints["pair"], speculative_config=spec)
    try:
        tok = llm.get_tokenizer()
        outs = llm.generate(PROMPTS, greedy(48))
    finally:
        stop_llm(llm)
    dec = FastIVLDecoder.from_pretrained(checkpoints["base"], checkpoints["value"])
    for prompt, out in zip(PROMPTS, outs, strict=True):
        assert list(out.outputs[0].token_ids) == reference(dec, tok(prompt).input_ids, 48)[0], prompt


def test_a_pair_as_the_draft_is_refused(checkpoints, capfd):
    spec = {"method": "draft_model", "model": str(checkpoints["small_pair"]), "num_speculative_tokens": 3}
    with pytest.raises(RuntimeError):  # the engine core fails to start; the worker's error names the cause
        start_llm(checkpoints["pair"], speculative_config=spec)
    captured = capfd.readouterr()  # vLLM's processes log the worker's exception
    assert "an IVL pair as vLLM's draft model" in captured.out + captured.err
