"""Loading a pair from its checkpoints: the models (base, value, draft, logit terms), the tokenizers of each side and
both generation configs, checked against each other where loading can tell (FastIVLDecoder.from_pretrained)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .decode.options import read_generation_config
from .models import load_model
from .schemes import check_scheme, scheme_of_checkpoint, uses_base, uses_value
from .tokenizer_identity import check_same_tokens, checkpoint_tokenizer_sides


@dataclass
class LoadedPair:
    """What :func:`load_pair` read: the engines (None where the scheme uses none), the tokenizers, their sides
    ({"base"|"value": tokenizer} as found in the checkpoints), the generation configs [(side, config or None)]
    (the value's first) and the scheme."""

    scheme: str
    base: object | None
    value: object | None
    draft: object | None
    terms: list
    tokenizer: object | None
    base_tokenizer: object | None
    sides: dict
    configs: list


def load_pair(
    base_path: str | Path | None,
    value_path: str | Path | None,
    vocab_map=None,
    *,
    scheme: str | None,
    device,
    dtype,
    engine: str,
    attn_backend: str,
    allow_pickle: bool,
    tokenizer,
    draft: str | Path | None,
    terms,
    tensor_parallel: int | None,
) -> LoadedPair:
    """The checkpoints of a pair loaded (see FastIVLDecoder.from_pretrained for every argument); a ValueError
    names what the scheme needs and is missing, or a draft / term whose tokenizer is not the pair's."""
    kw = dict(device=device, dtype=dtype, engine=engine, attn_backend=attn_backend, allow_pickle=allow_pickle)
    scheme = scheme_of_checkpoint(value_path) if scheme is None else check_scheme(scheme)
    need_base, need_value = uses_base(scheme), uses_value(scheme)
    if need_base and base_path is None:
        raise ValueError(f"scheme={scheme!r} needs base_path")
    if need_value and value_path is None:
        raise ValueError(f"scheme={scheme!r} needs value_path")
    if draft is not None and not need_base:
        raise ValueError(f"draft needs a base model to verify its tokens; scheme={scheme!r} has none")
    if tensor_parallel not in (None, 1) and not need_base:
        raise ValueError(f"tensor_parallel={tensor_parallel} shards the base; scheme={scheme!r} has none")
    base = load_model(base_path, **kw, tensor_parallel=tensor_parallel) if need_base else None
    if base is not None and getattr(base, "plan", None) is not None and kw["device"] is None:
        kw["device"] = base.device  # the rank's device (cuda:LOCAL_RANK) for the replicated models too
    value = load_model(value_path, **kw) if need_value else None
    draft_model = load_model(draft, **kw) if draft is not None else None
    term_models = [(load_model(p, **kw), w) for p, w in terms or ()]
    tokenizer, base_tokenizer, sides = checkpoint_tokenizer_sides(
        tokenizer, base_path if need_base else None, value_path if need_value else None, base, value, vocab_map
    )
    if vocab_map is None:  # a draft or term padded to other rows than the pair's: its tokenizer must match
        ref_rows = (base or value).vocab_size
        extra = [(draft, draft_model, "the draft")] + [
            (p, m, f"terms[{i}]") for i, ((p, _), (m, _)) in enumerate(zip(terms or (), term_models, strict=True))
        ]
        for path, model, what in extra:
            if model is not None and model.vocab_size != ref_rows:
                check_same_tokens(tokenizer, path, model.vocab_size, what)
    # the value network's generation_config.json, else the base's; the EOS ids of both (and of both tokenizers)
    configs = [
        (name, read_generation_config(p))
        for name, p, used in (("value", value_path, need_value), ("base", base_path, need_base))
        if used
    ]
    return LoadedPair(scheme, base, value, draft_model, term_models, tokenizer, base_tokenizer, sides, configs)
