"""Helpers of the tests of the pair on a real vLLM engine (vllm-cpu), which run in the venv .ci/vllm builds (vLLM pins
another transformers than the main suite). Every module starts its engine(s) once; without vLLM installed, importing
this module skips the test module with a reason naming the stage that runs it."""

from __future__ import annotations

import gc
import os

import pytest

# vLLM's CPU backend takes most of the machine's memory for its KV cache by default (21 of 24 GiB seen here): one
# GiB is plenty for these models, and leaves room for the engine processes beside the tests
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

vllm = pytest.importorskip("vllm", reason="vLLM is not installed here: .ci/vllm builds its venv and runs tests/on_vllm")

MAX_MODEL_LEN = 256
PROMPTS = [
    "The for statement",
    "A while loop repeats until the condition is false, and",
    "x",
    "Classes provide a means of bundling data and functionality together. Creating a new class creates",
]


def start_llm(path, **kwargs):
    """A vLLM engine (``vllm.LLM``) on ``path`` in fp32 (the reference decoder's dtype), seed 0."""
    from vllm import LLM

    return LLM(str(path), dtype="float32", max_model_len=MAX_MODEL_LEN, seed=0, **kwargs)


def stop_llm(llm) -> None:
    """Shut the engine's processes down now (the next module starts its own)."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
    del llm
    gc.collect()


def greedy(max_tokens: int = 64, **kwargs):
    """Greedy sampling params, EOS ignored (random weights: every row runs its full length), the sampled token's
    log-probability returned."""
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=0, **kwargs)


def sampled_logprobs(completion) -> list[float]:
    """The log-probability vLLM reports for each token it produced (``logprobs=0``: the sampled one only)."""
    return [lp[t].logprob for t, lp in zip(completion.token_ids, completion.logprobs, strict=True)]


def reference(decoder, token_ids: list[int], max_new_tokens: int = 64):
    """(new token ids, their log-probabilities) of FastIVLDecoder's greedy decode of one prompt, EOS ignored."""
    import torch

    out = decoder.generate(
        torch.tensor([token_ids]), max_new_tokens=max_new_tokens, do_sample=False, return_logprobs=True, eos_token_id=[]
    )
    n = len(token_ids)
    return out.sequences[0, n:].tolist(), out.logprobs[0].tolist()
