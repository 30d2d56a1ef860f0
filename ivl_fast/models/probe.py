"""The linear-probe value model (paper Section 3.2, Figure 2): no network of its own over the tokens, only the
Llama MLP (SwiGLU, the block of Appendix A.1) on the base's final (normed) hidden state, then its own head.

    h      = the base's final hidden state, normed    [.., H_base]
    delta  = W_head (W_down (silu(W_gate h) * (W_up h)))  [.., V]
    z_post = z_base + alpha * delta

It is trained like a value network (the same fused CE + L1 loss on z_base + delta) and decodes as scheme
"probe": each step the base returns its hidden state with its logits and the probe reads it (no KV cache of its
own). It reads hidden states of its training base's width, so it cannot move to a base of another size: that is
the paper's argument for a separate value network, and the demo's probe row measures it on the training base.

A checkpoint: ``config.json`` (``model_type: "ivl_probe"``), ``model.safetensors``, the tokenizer, ``ivl.json``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_int

PROBE_MODEL_TYPE = "ivl_probe"


class ProbeValue(nn.Module):
    """base_hidden_size: the width of the hidden states it reads; intermediate_size: its MLP's; vocab_size: the
    base's vocabulary (the delta's length)."""

    def __init__(self, base_hidden_size: int, intermediate_size: int, vocab_size: int):
        super().__init__()
        for name, v in (
            ("base_hidden_size", base_hidden_size),
            ("intermediate_size", intermediate_size),
            ("vocab_size", vocab_size),
        ):
            check_int(v, name, 1)
        self.base_hidden_size, self.intermediate_size = base_hidden_size, intermediate_size
        self.gate_proj = nn.Linear(base_hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(base_hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, base_hidden_size, bias=False)
        self.lm_head = nn.Linear(base_hidden_size, vocab_size, bias=False)
        self.config = None  # no transformers config: the decoder's special ids come from the base / tokenizer

    @property
    def vocab_size(self) -> int:
        return self.lm_head.weight.shape[0]

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def head_weight(self) -> torch.Tensor:
        return self.lm_head.weight

    def forward(self, base_hidden: torch.Tensor) -> torch.Tensor:
        """[.., H_base] -> the probe's hidden state [.., H_base] (what its head reads; the fused loss's input)."""
        h = base_hidden.to(self.dtype)
        return self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))

    def logits(self, base_hidden: torch.Tensor) -> torch.Tensor:
        """[.., H_base] -> the logits delta [.., V]."""
        return F.linear(self(base_hidden), self.head_weight())

    def check_base(self, hidden_size: int, vocab_size: int) -> None:
        """The base it is applied to has its training base's width and vocabulary (ValueError otherwise)."""
        if hidden_size != self.base_hidden_size:
            raise ValueError(
                f"the probe reads hidden states of width {self.base_hidden_size} (its training base's); this base's "
                f"are {hidden_size}: a probe does not move to a base of another size"
            )
        if vocab_size != self.vocab_size:
            raise ValueError(f"the probe gives {self.vocab_size} logits; the base has {vocab_size}")

    @classmethod
    def from_config(cls, raw: dict) -> ProbeValue:
        return cls(int(raw["base_hidden_size"]), int(raw["intermediate_size"]), int(raw["vocab_size"]))


def probe_config(base_hidden_size: int, intermediate_size: int, vocab_size: int) -> dict:
    """A probe checkpoint's config.json."""
    return {
        "model_type": PROBE_MODEL_TYPE,
        "base_hidden_size": base_hidden_size,
        "intermediate_size": intermediate_size,
        "vocab_size": vocab_size,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }


def is_probe_config(raw: dict) -> bool:
    return raw.get("model_type") == PROBE_MODEL_TYPE


def load_probe(path: str | Path, raw: dict, device, dtype) -> ProbeValue:
    """A probe checkpoint directory (its config already read) -> ProbeValue on ``device`` in ``dtype``, eval."""
    from safetensors.torch import load_file

    probe = ProbeValue.from_config(raw)
    state = load_file(str(Path(path) / "model.safetensors"))
    missing, unexpected = probe.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: not a probe's weights (missing {sorted(missing)}, unexpected {sorted(unexpected)})")
    return probe.to(device=device, dtype=dtype).eval().requires_grad_(False)


__all__ = ["PROBE_MODEL_TYPE", "ProbeValue", "is_probe_config", "load_probe", "probe_config"]
