"""IVL on vLLM: a base + value pair served by vLLM like any other model (paged KV cache, prefix caching,
continuous batching, tensor parallelism, its OpenAI server and samplers).

- :mod:`ivl_fast.vllm.pair_dir`: ``ivl-fast export-vllm`` writes the directory ``vllm serve`` loads (no vLLM
  needed to write it);
- :mod:`ivl_fast.vllm.model`: ``IVLForCausalLM``, the pair as one vLLM model (imports vLLM);
- :func:`register`: the ``vllm.general_plugins`` entry point (pyproject.toml), which vLLM calls in every process it
  starts, so an installed ivl-fast is all ``vllm serve`` needs.
"""

from __future__ import annotations

from .pair_dir import ARCHITECTURE, PairSpec, export_pair


def register() -> None:
    """Register ``IVLForCausalLM`` with vLLM's model registry (lazily: vLLM imports the module when it builds one)."""
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "ivl_fast.vllm.model:IVLForCausalLM")


__all__ = ["ARCHITECTURE", "PairSpec", "export_pair", "register"]
