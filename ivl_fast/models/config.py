"""The lean engine's view of a config.json: Llama and the families that differ from it in a few switches
(:mod:`~ivl_fast.models.families`: Mistral, Qwen2/3, Gemma 2/3, Phi-3/3.5/4-mini, OLMo 2, Granite, SmolLM3).

Reads both the transformers-4 layout (``rope_theta`` + ``rope_scaling``) and the transformers-5 layout
(``rope_parameters``, per layer type for Gemma 3), so checkpoints saved by either load the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from dataclasses import dataclass, field

import torch

from .families import ACTIVATIONS, FAMILY_RULES, MULTIMODAL_TEXT, Arch, LayerSpec

LEAN_MODEL_TYPES = tuple(FAMILY_RULES) + tuple(MULTIMODAL_TEXT)
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "longrope")

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
    # longrope (Phi-3/3.5/4-mini): per-frequency divisors below and above the original context
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    attention_factor: float = 1.0  # cos and sin are multiplied by it (longrope's sqrt(1 + ln f / ln L0))
    rotary_dim: int = 0  # the leading head dims that rotate (partial_rotary_factor * head_dim); 0: all


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
    torch_dtype: torch.dtype | None
    bos_token_id: int | list[int] | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    arch: Arch = field(default_factory=Arch)
    layers: tuple[LayerSpec, ...] = ()  # one per layer: its attention window and rotary table
    rope_local: RopeConfig | None = None  # Gemma 3's sliding layers' rotary table
    multimodal: str | None = None  # the checkpoint's own model_type when this is the text part of it (gemma3)
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def max_context(self) -> int:
        """Longest sequence the lean engine runs: the model's context (times the factor for dynamic NTK rope,
        which exists to extend it). Sliding-window layers mask keys beyond their window; the cache keeps every
        column (no ring buffer), so the window does not bound the context."""
        ctx = self.max_position_embeddings
        if self.rope.rope_type == "dynamic":
            ctx = int(ctx * self.rope.factor)
        return ctx

    @classmethod
    def from_dict(cls, cfg: dict) -> LeanConfig:
        mt = cfg.get("model_type")
        if mt not in LEAN_MODEL_TYPES:
            raise UnsupportedArchitecture(
                f"model_type {mt!r} is not implemented by the lean engine (supported: {', '.join(LEAN_MODEL_TYPES)})"
            )
        multimodal = None
        if mt in MULTIMODAL_TEXT:  # the text model of a multimodal checkpoint: its text_config
            multimodal, text = mt, cfg.get("text_config")
            if not isinstance(text, dict):
                raise ValueError(f"config.json of this {mt} checkpoint has no text_config object")
            mt = MULTIMODAL_TEXT[mt][0]
            tied = cfg.get("tie_word_embeddings", text.get("tie_word_embeddings"))
            cfg = {**text, "model_type": mt, **({} if tied is None else {"tie_word_embeddings": tied})}
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in required if cfg.get(k) is None]
        if missing:
            raise ValueError(f"config.json of this {mt} checkpoint lacks required key(s) {missing}")
        cfg = _normalised(cfg)
        act_key = "hidden_activation" if cfg.get("hidden_activation") else "hidden_act"
        act = ACTIVATIONS.get(cfg.get(act_key) or "silu")
        if act is None:
            raise UnsupportedArchitecture(
                f"{act_key} {cfg.get(act_key)!r} is not implemented by the lean engine (silu, gelu_pytorch_tanh)"
            )
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        if heads % kv_heads:
            raise ValueError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        n_layers = int(cfg["num_hidden_layers"])
        arch, layers = FAMILY_RULES[mt](cfg, n_layers)
        if act != arch.act:  # a family's activation is part of its switches; the config may not contradict it
            arch = dataclasses.replace(arch, act=act)
        rope_params = _rope_params(cfg)
        rope_local = None
        if any(layer.rope == "local" for layer in layers):  # Gemma 3: per layer type
            rope = _parse_rope(cfg, rope_params.get("full_attention") or {}, head_dim)
            local = rope_params.get("sliding_attention") or {"rope_theta": cfg.get("rope_local_base_freq", 10000.0)}
            rope_local = _parse_rope(cfg, local, head_dim)
        else:
            rope = _parse_rope(cfg, rope_params, head_dim)
        if mt == "qwen2":
            qkv_bias, o_bias = True, False
        elif mt == "phi3":
            qkv_bias = o_bias = False
        else:
            qkv_bias = o_bias = bool(cfg.get("attention_bias", False))
        dtype = cfg.get("torch_dtype", cfg.get("dtype"))
        return cls(
            model_type=mt,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=n_layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            rope=rope,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)) and mt != "phi3",
            torch_dtype=parse_dtype(dtype) if isinstance(dtype, str) else None,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
            pad_token_id=cfg.get("pad_token_id"),
            arch=arch,
            layers=tuple(layers),
            rope_local=rope_local,
            multimodal=multimodal,
            raw=dict(cfg),
        )


def _normalised(cfg: dict) -> dict:
    """``cfg`` through the installed transformers' own config class of its model_type (the defaults and derived
    fields its model would use: layer_types, no_rope_layers, soft-capping...), or as it is when transformers does
    not know the family or refuses the values (then the lean engine's own defaults, the same as transformers 5's)."""
    try:
        from transformers import AutoConfig
    except ImportError:  # pragma: no cover - transformers is a dependency
        return cfg
    kwargs = {k: v for k, v in cfg.items() if k != "model_type"}
    quiet = logging.getLogger("transformers")
    level = quiet.level
    try:
        quiet.setLevel(logging.ERROR)  # its warnings about keys it does not know are not the user's business
        with contextlib.suppress(Exception):
            full = AutoConfig.for_model(cfg["model_type"], **kwargs).to_dict()
            return {**cfg, **{k: v for k, v in full.items() if v is not None or k not in cfg}}
    finally:
        quiet.setLevel(level)
    return cfg


def _rope_params(cfg: dict) -> dict:
    """transformers 5: "rope_parameters" (rope_theta inside; per layer type for Gemma 3); transformers 4:
    "rope_scaling" (+ "rope_theta" at the top)."""
    return dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})


def _parse_rope(cfg: dict, params: dict, head_dim: int) -> RopeConfig:
    params = dict(params)
    if "rope_theta" not in params and params and isinstance(next(iter(params.values())), dict):
        raise UnsupportedArchitecture("per-layer-type rope_parameters are implemented for Gemma 3 only")
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    rtype = params.get("rope_type", params.get("type", "default")) or "default"
    rtype = {"su": "longrope"}.get(rtype, rtype)  # the first Phi-3-128k configs named longrope "su"
    partial = float(params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)) or 1.0)
    rotary_dim = int(head_dim * partial)
    if not 0 < rotary_dim <= head_dim or rotary_dim % 2:
        raise ValueError(f"partial_rotary_factor={partial} gives {rotary_dim} rotary dims of {head_dim}; need even > 0")
    if rtype not in ROPE_TYPES:
        raise UnsupportedArchitecture(
            f"rope type {rtype!r} is not implemented by the lean engine (supported: {', '.join(ROPE_TYPES)})"
        )
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for rotary embeddings, got {head_dim}")
    rot = rotary_dim if rotary_dim != head_dim else 0
    if rtype == "default":
        return RopeConfig("default", theta, rotary_dim=rot)
    if rtype == "longrope":
        orig = int(params.get("original_max_position_embeddings") or cfg.get("original_max_position_embeddings") or 0)
        if orig <= 0:
            raise ValueError("longrope needs original_max_position_embeddings in config.json")
        short, long = tuple(map(float, params["short_factor"])), tuple(map(float, params["long_factor"]))
        if len(short) != rotary_dim // 2 or len(long) != rotary_dim // 2:
            raise ValueError(
                f"longrope short_factor/long_factor need {rotary_dim // 2} entries (rotary dims / 2), "
                f"got {len(short)} and {len(long)}"
            )
        factor = params.get("factor") or int(cfg.get("max_position_embeddings", orig)) / orig
        att = params.get("attention_factor")
        if att is None:  # as transformers: the paper's suggestion
            att = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
        return RopeConfig(
            "longrope",
            theta,
            float(factor),
            original_max_position_embeddings=orig,
            short_factor=short,
            long_factor=long,
            attention_factor=float(att),
            rotary_dim=rot,
        )
    factor = float(params["factor"])
    if rtype == "llama3":
        return RopeConfig(
            "llama3",
            theta,
            factor,
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
            rotary_dim=rot,
        )
    return RopeConfig(rtype, theta, factor, rotary_dim=rot)
