"""The lean engine's view of a Llama-family config.json (Llama 1/2/3/3.1/3.2, TinyLlama, CodeLlama, Mistral, Qwen2).

Reads both the transformers-4 layout (``rope_theta`` + ``rope_scaling``) and the transformers-5 layout
(``rope_parameters``), so checkpoints saved by either load the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

LEAN_MODEL_TYPES = ("llama", "mistral", "qwen2")
ROPE_TYPES = ("default", "linear", "dynamic", "llama3")

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
    "fp64": torch.float64,
}


class UnsupportedArchitecture(ValueError):
    """The checkpoint is valid but the lean engine does not implement it (the HF adapter can still run it)."""


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().replace("torch.", "")
    if key == "auto":
        return None
    if key not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; expected one of float32, float16, bfloat16 (or 'auto')")
    return _DTYPES[key]


@dataclass(frozen=True)
class RopeConfig:
    rope_type: str = "default"
    theta: float = 10000.0
    factor: float = 1.0
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class LeanConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    sliding_window: int | None
    torch_dtype: torch.dtype | None
    bos_token_id: int | list[int] | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def max_context(self) -> int:
        """Longest sequence the lean engine runs: the model's context (times the factor for dynamic NTK rope,
        which exists to extend it), capped at the sliding window, beyond which Mistral would need one."""
        ctx = self.max_position_embeddings
        if self.rope.rope_type == "dynamic":
            ctx = int(ctx * self.rope.factor)
        return min(ctx, int(self.sliding_window)) if self.sliding_window else ctx

    @classmethod
    def from_dict(cls, cfg: dict) -> LeanConfig:
        mt = cfg.get("model_type")
        if mt not in LEAN_MODEL_TYPES:
            raise UnsupportedArchitecture(
                f"model_type {mt!r} is not implemented by the lean engine (supported: {', '.join(LEAN_MODEL_TYPES)})"
            )
        act = cfg.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise UnsupportedArchitecture(f"hidden_act {act!r} is not implemented by the lean engine (only silu)")
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in required if cfg.get(k) is None]
        if missing:
            raise ValueError(f"config.json of this {mt} checkpoint lacks required key(s) {missing}")
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        if heads % kv_heads:
            raise ValueError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        rope = _parse_rope(cfg, head_dim)
        if mt == "qwen2":
            qkv_bias, o_bias = True, False
            sliding = cfg.get("sliding_window") if cfg.get("use_sliding_window", False) else None
        else:
            qkv_bias = o_bias = bool(cfg.get("attention_bias", False))
            sliding = cfg.get("sliding_window") if mt == "mistral" else None
        dtype = cfg.get("torch_dtype", cfg.get("dtype"))
        return cls(
            model_type=mt,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            rope=rope,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            sliding_window=int(sliding) if sliding else None,
            torch_dtype=parse_dtype(dtype) if isinstance(dtype, str) else None,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
            pad_token_id=cfg.get("pad_token_id"),
            raw=dict(cfg),
        )


def _parse_rope(cfg: dict, head_dim: int) -> RopeConfig:
    # transformers 5: "rope_parameters" holds rope_theta too; transformers 4: "rope_theta" + "rope_scaling".
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    if "rope_theta" not in params and params and isinstance(next(iter(params.values())), dict):
        raise UnsupportedArchitecture("per-layer-type rope_parameters are not implemented by the lean engine")
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    rtype = params.get("rope_type", params.get("type", "default")) or "default"
    if float(params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)) or 1.0) != 1.0:
        raise UnsupportedArchitecture("partial_rotary_factor != 1 is not implemented by the lean engine")
    if rtype not in ROPE_TYPES:
        raise UnsupportedArchitecture(
            f"rope type {rtype!r} is not implemented by the lean engine (supported: {', '.join(ROPE_TYPES)})"
        )
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for rotary embeddings, got {head_dim}")
    if rtype == "default":
        return RopeConfig("default", theta)
    factor = float(params["factor"])
    if rtype == "llama3":
        return RopeConfig(
            "llama3",
            theta,
            factor,
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    return RopeConfig(rtype, theta, factor)
