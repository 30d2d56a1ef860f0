"""A pair of two architectures, widths, depths, head sizes, KV heads and embedding row counts on vLLM's ``LLM``:
greedy tokens equal to FastIVLDecoder's, token for token, over a ragged batch of 64-token generations, and the
log-probabilities vLLM reports equal to the decoder's within 1e-4. One engine for the module."""

from __future__ import annotations

import json

import pytest
from conftest import build_model
from vllm_fixtures import PROMPTS, greedy, reference, sampled_logprobs, start_llm, stop_llm

from ivl_fast import FastIVLDecoder
from ivl_fast.vllm import export_pair


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, tokenizer, save_checkpoint):
    """base: Llama, 4 layers x 256, 8 heads of 32 (4 KV heads), its embedding padded 64 rows past the tokenizer;
    value: Qwen2 (q/k/v biases), 2 layers x 128, 2 heads of 64 (1 KV head), the tokenizer's rows."""
    n = len(tokenizer)
    base = build_model(
        "llama",
        seed=0,
        vocab_size=n + 64,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
    )
    value = build_model(
        "qwen2",
        seed=1,
        vocab_size=n,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    base_dir, value_dir = save_checkpoint(base, "vllm_base"), save_checkpoint(value, "vllm_value")
    out = export_pair(base_dir, value_dir, tmp_path_factory.mktemp("vllm_pair") / "pair")
    llm = start_llm(out)
    yield base_dir, value_dir, out, llm
    stop_llm(llm)


def test_exported_pair_records_the_padding(mixed, tokenizer):
    _, _, out, _ = mixed
    assert json.loads((out / "config.json").read_text())["ivl_real_vocab"] == len(tokenizer)


def test_greedy_equals_fast_ivl_decoder(mixed, tokenizer):
    base_dir, value_dir, _, llm = mixed
    outs = llm.generate(PROMPTS, greedy(64))  # one ragged batch: prompts of 2 to 20 tokens
    dec = FastIVLDecoder.from_pretrained(base_dir, value_dir)
    for prompt, out in zip(PROMPTS, outs, strict=True):
        ids = tokenizer(prompt).input_ids
        assert list(out.prompt_token_ids) == ids
        want, want_lp = reference(dec, ids, 64)
        got = list(out.outputs[0].token_ids)
        assert got == want, prompt
        assert max(t for t in got) < len(tokenizer)  # the base's padding rows are never chosen
        lp = sampled_logprobs(out.outputs[0])
        assert max(abs(a - b) for a, b in zip(lp, want_lp, strict=True)) < 1e-4


def test_token_id_prompts_and_a_batch_of_one(mixed, tokenizer):
    """Prompts given as token ids (no tokenizer on the way), and alone, decode as in the batch above."""
    base_dir, value_dir, _, llm = mixed
    ids = tokenizer(PROMPTS[3]).input_ids
    alone = llm.generate([{"prompt_token_ids": ids}], greedy(32))[0].outputs[0]
    dec = FastIVLDecoder.from_pretrained(base_dir, value_dir)
    assert list(alone.token_ids) == reference(dec, ids, 32)[0]


def test_pipeline_parallel_is_refused(mixed):
    """vLLM refuses it before starting anything: the pair does not split its two stacks into stages."""
    _, _, out, _ = mixed
    with pytest.raises(NotImplementedError, match="Pipeline parallelism is not supported"):
        start_llm(out, pipeline_parallel_size=2)


def test_a_shorter_value_context_bounds_the_pair(mixed, tmp_path):
    """A value network with 128 positions under a 256-position base: the pair's context is 128, and asking vLLM
    for more is refused before an engine starts."""
    import shutil

    base_dir, value_dir, _, _ = mixed
    short = tmp_path / "short_value"
    shutil.copytree(value_dir, short)
    cfg = json.loads((short / "config.json").read_text())
    cfg["max_position_embeddings"] = 128
    (short / "config.json").write_text(json.dumps(cfg))
    out = export_pair(base_dir, short, tmp_path / "pair")
    with pytest.raises(ValueError, match="max_model_len"):
        start_llm(out)  # asks for MAX_MODEL_LEN = 256
