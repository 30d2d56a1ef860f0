"""How each model family differs from Llama, in one place: a family is Llama plus the switches of :class:`Arch`
and a :class:`LayerSpec` per layer (its attention window and which rotary table it reads).

Read ``FAMILY_RULES`` as a diff from Llama::

    llama, mistral, qwen2    Llama (Mistral: a sliding window on every layer; Qwen2: bias on q/k/v)
    qwen3                    + q/k RMSNorm per head before rope
    gemma2                   + (1 + w) norms in fp32, sandwich norms, GeGLU, sqrt(H) embedding scale,
                               1/sqrt(query_pre_attn_scalar) scale, tanh soft-capping of scores and logits,
                               alternating sliding-window layers
    gemma3_text, gemma3      gemma2 - score soft-capping + q/k norm per head, a local rotary table on sliding layers
    phi3                     + fused qkv_proj and gate_up_proj, longrope, partial rotary (Phi-4-mini)
    olmo2                    post-norms only (no input norm), q/k RMSNorm over the whole projection, fp32 weight mul
    granite                  + embedding, residual, attention and logit multipliers
    smollm3                  + NoPE layers (no rotary on every 4th layer by default)

The configs are first normalised by transformers' own config class (when the installed transformers knows the
family), so defaults a hub ``config.json`` leaves out (``layer_types``, ``no_rope_layers``, soft-capping values)
are the ones transformers' own model would use.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

NORM_LAYOUTS = ("pre", "sandwich", "post")


@dataclass(frozen=True)
class Arch:
    """A family's departures from Llama (the defaults are Llama)."""

    norm_offset: bool = False  # Gemma: x_normed * (1 + w)
    norm_upcast: bool = False  # Gemma, OLMo 2: the weight multiplies the fp32 normed values, then the cast
    # "pre": x + f(norm(x)) (Llama); "sandwich": x + post_norm(f(pre_norm(x))) (Gemma 2/3);
    # "post": x + post_norm(f(x)) (OLMo 2, no input norm)
    norm_layout: str = "pre"
    qk_norm: str | None = None  # "head": RMSNorm(head_dim) on q/k per head (Qwen3, Gemma 3); "proj": over the
    # whole q [H*D] / k [Hkv*D] projection before the head split (OLMo 2)
    act: str = "silu"  # "gelu_tanh": Gemma's GeGLU (gelu_pytorch_tanh)
    fused_qkv: bool = False  # Phi-3: one qkv_proj [(H + 2 Hkv) D, Hd] and one gate_up_proj [2 I, Hd]
    embed_scale: float = 1.0  # Gemma sqrt(H) (cast to the weights' dtype, as transformers does); Granite multiplier
    attn_scale: float | None = None  # None: head_dim ** -0.5
    residual_scale: float = 1.0  # Granite: x + f(x) * residual_multiplier
    logit_scale: float = 1.0  # Granite: logits / logits_scaling
    attn_softcap: float | None = None  # Gemma 2: scores <- c * tanh(scores / c) before the mask
    final_softcap: float | None = None  # Gemma 2: logits <- c * tanh(logits / c)


@dataclass(frozen=True)
class LayerSpec:
    """One layer's attention: ``window`` (keys at positions > p - window are seen from position p; None: all)
    and ``rope`` ("global", "local": Gemma 3's sliding layers' own table, None: no rotary, SmolLM3's NoPE)."""

    window: int | None = None
    rope: str | None = "global"


def _layer_types(cfg: dict, n: int, default: Callable[[int], str]) -> list[str]:
    types = cfg.get("layer_types")
    if isinstance(types, list) and len(types) == n:
        return [str(t) for t in types]
    return [default(i) for i in range(n)]


def _windows(cfg: dict, n: int, *, sliding_on: Callable[[int, str], bool]) -> list[int | None]:
    w = cfg.get("sliding_window")
    if not w:
        return [None] * n
    types = _layer_types(cfg, n, lambda i: "sliding_attention")
    return [int(w) if sliding_on(i, types[i]) else None for i in range(n)]


def _llama(cfg: dict, n: int):
    return Arch(), [LayerSpec() for _ in range(n)]


def _mistral(cfg: dict, n: int):
    return Arch(), [LayerSpec(window=w) for w in _windows(cfg, n, sliding_on=lambda i, t: True)]


def _qwen(cfg: dict, n: int, qk_norm: str | None):
    # transformers: sliding_window only with use_sliding_window, on the layers from max_window_layers on
    use = bool(cfg.get("use_sliding_window", False))
    mwl = int(cfg.get("max_window_layers") or 0)
    types = _layer_types(cfg, n, lambda i: "sliding_attention" if i >= mwl else "full_attention")
    w = cfg.get("sliding_window") if use else None
    specs = [LayerSpec(window=int(w) if w and types[i] == "sliding_attention" else None) for i in range(n)]
    return Arch(qk_norm=qk_norm), specs


def _gemma(cfg: dict, n: int, *, v3: bool):
    hidden = int(cfg["hidden_size"])
    pattern = int(cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or (6 if v3 else 2))
    types = _layer_types(cfg, n, lambda i: "sliding_attention" if (i + 1) % pattern else "full_attention")
    w = cfg.get("sliding_window")
    arch = Arch(
        norm_offset=True,
        norm_upcast=True,
        norm_layout="sandwich",
        qk_norm="head" if v3 else None,
        act="gelu_tanh",
        embed_scale=math.sqrt(hidden),
        attn_scale=float(cfg.get("query_pre_attn_scalar") or 256) ** -0.5,
        # Gemma 3's attention does not pass its config's attn_logit_softcapping on (transformers); neither do we
        attn_softcap=None if v3 else _opt_float(cfg.get("attn_logit_softcapping", 50.0)),
        final_softcap=_opt_float(cfg.get("final_logit_softcapping", None if v3 else 30.0)),
    )
    specs = []
    for t in types:
        sliding = t == "sliding_attention"
        specs.append(
            LayerSpec(window=int(w) if (w and sliding) else None, rope="local" if (v3 and sliding) else "global")
        )
    return arch, specs


def _phi3(cfg: dict, n: int):
    return Arch(fused_qkv=True), [LayerSpec(window=w) for w in _windows(cfg, n, sliding_on=lambda i, t: True)]


def _olmo2(cfg: dict, n: int):
    return Arch(norm_upcast=True, norm_layout="post", qk_norm="proj"), [LayerSpec() for _ in range(n)]


def _granite(cfg: dict, n: int):
    arch = Arch(
        embed_scale=float(cfg.get("embedding_multiplier", 1.0)),
        attn_scale=float(cfg.get("attention_multiplier", 1.0)),
        residual_scale=float(cfg.get("residual_multiplier", 1.0)),
        logit_scale=1.0 / float(cfg.get("logits_scaling", 1.0)),
    )
    return arch, [LayerSpec() for _ in range(n)]


def _smollm3(cfg: dict, n: int):
    interval = int(cfg.get("no_rope_layer_interval") or 4)
    use_rope = cfg.get("no_rope_layers")
    if not (isinstance(use_rope, list) and len(use_rope) == n):
        use_rope = [int((i + 1) % interval != 0) for i in range(n)]
    types = _layer_types(cfg, n, lambda i: "full_attention")
    w = cfg.get("sliding_window") if cfg.get("use_sliding_window") else None
    specs = [
        LayerSpec(
            window=int(w) if w and types[i] == "sliding_attention" else None, rope="global" if use_rope[i] else None
        )
        for i in range(n)
    ]
    return Arch(), specs


def _opt_float(x) -> float | None:
    return None if x is None else float(x)


# model_type -> (config dict, number of layers) -> (Arch, [LayerSpec] * layers)
FAMILY_RULES: dict[str, Callable[[dict, int], tuple[Arch, list[LayerSpec]]]] = {
    "llama": _llama,
    "mistral": _mistral,
    "qwen2": lambda c, n: _qwen(c, n, None),
    "qwen3": lambda c, n: _qwen(c, n, "head"),
    "gemma2": lambda c, n: _gemma(c, n, v3=False),
    "gemma3_text": lambda c, n: _gemma(c, n, v3=True),
    "phi3": _phi3,
    "olmo2": _olmo2,
    "granite": _granite,
    "smollm3": _smollm3,
}

# the activation each family may declare (hidden_act / hidden_activation) -> the engine's name for it
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}

# multimodal checkpoints whose text part is a lean family: model_type -> (text model_type, weight prefixes of
# the text model in the checkpoint -> the lean engine's names). transformers >= 5 saves
# model.language_model.* + lm_head.*; 4.50-4.57 saved language_model.model.* + language_model.lm_head.*
MULTIMODAL_TEXT = {
    "gemma3": (
        "gemma3_text",
        (
            ("model.language_model.", "model."),
            ("language_model.model.", "model."),
            ("language_model.lm_head.", "lm_head."),
            ("lm_head.", "lm_head."),
        ),
    ),
}


def text_weight_name(model_type: str, name: str) -> str | None:
    """The lean engine's name of a multimodal checkpoint's weight ``name``, None for the parts it does not run
    (vision tower, projector)."""
    for prefix, to in MULTIMODAL_TEXT[model_type][1]:
        if name.startswith(prefix):
            return to + name[len(prefix) :]
    return None
