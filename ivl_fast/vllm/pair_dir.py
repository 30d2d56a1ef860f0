"""The directory that vLLM serves a base + value pair from (``ivl-fast export-vllm``), and what it records.

No weights are copied: a 70B base is 140 GB. The directory holds

- ``config.json``: the base's own config (vLLM reads its context length, dtype and family from it) with
  ``architectures = ["IVLForCausalLM"]`` (the model :mod:`ivl_fast.vllm.model` registers) and the pair, as flat
  ``ivl_*`` keys so ``vllm serve DIR --hf-overrides '{"ivl_alpha": 0.5}'`` changes one of them at launch:
  ``ivl_base`` / ``ivl_value`` (absolute checkpoint directories, read in place), ``ivl_alpha``,
  ``ivl_base_architectures`` (the class vLLM builds the base with), ``ivl_real_vocab`` (one tokenizer under
  embeddings padded to different row counts: the ids past it are masked) and ``ivl_format``;
  ``max_sequence_length`` when the value network's context is shorter than the base's (vLLM takes the smallest
  length key, so the pair's context is the shorter of the two);
- the pair's tokenizer and chat template (as ``FastIVLDecoder.from_pretrained`` picks them: the base's files,
  else the value's; without a chat template the one ``ivl-fast serve`` renders with);
- ``generation_config.json``: the value network's, else the base's, stopping at both sides' EOS ids: the
  defaults ``FastIVLDecoder.from_pretrained`` decodes with (vLLM reads it for default sampling and stop ids);
- ``ivl_pair.safetensors``: one marker tensor, so vLLM's loader finds a weight file here; the model then streams
  each checkpoint's own files (``DefaultModelLoader``'s secondary weight sources).

What a pair on vLLM cannot be is refused here, before anything is written: two tokenizers (use ``ivl-fast serve
--vocab-map``), cascade and probe value networks (they read the base's distribution or hidden state, which vLLM's
model classes do not hand over), pickled or quantized checkpoints.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..checks import check_finite, is_int

ARCHITECTURE = "IVLForCausalLM"
FORMAT = 1
MARKER = "ivl_pair.safetensors"
_KEYS = ("ivl_format", "ivl_base", "ivl_value", "ivl_alpha", "ivl_base_architectures", "ivl_real_vocab")
_CROSS_VOCAB_HINT = (
    "vLLM serves one vocabulary; for a base and value network with different tokenizers build a map "
    "(`ivl-fast vocab-map`) and serve with `ivl-fast serve --vocab-map`"
)


@dataclass(frozen=True)
class PairSpec:
    """What the pair directory's config.json records (see the module docstring); ``from_config`` checks it."""

    base: str
    value: str
    alpha: float
    base_architectures: tuple[str, ...]
    real_vocab: int | None = None

    def to_config(self) -> dict:
        return {
            "ivl_format": FORMAT,
            "ivl_base": self.base,
            "ivl_value": self.value,
            "ivl_alpha": self.alpha,
            "ivl_base_architectures": list(self.base_architectures),
            "ivl_real_vocab": self.real_vocab,
        }

    @classmethod
    def from_config(cls, config) -> PairSpec:
        """The pair of a config object (vLLM's ``hf_config``: attributes) or dict, each field checked (ValueError
        naming the key: these keys can be edited, or overridden with ``--hf-overrides``)."""
        get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
        missing = [k for k in _KEYS if k != "ivl_real_vocab" and get(k) is None]
        if missing:
            raise ValueError(
                f"this config has no {', '.join(missing)}: not a directory written by `ivl-fast export-vllm`"
            )
        if get("ivl_format") != FORMAT:
            raise ValueError(f"ivl_format {get('ivl_format')!r} is not one this ivl-fast reads ({FORMAT})")
        for key in ("ivl_base", "ivl_value"):
            if not isinstance(get(key), str) or not Path(get(key)).is_dir():
                raise ValueError(f"{key} must name a checkpoint directory, got {get(key)!r}")
        alpha = get("ivl_alpha")
        check_finite(alpha, "ivl_alpha")
        archs = get("ivl_base_architectures")
        if not isinstance(archs, list | tuple) or not archs or not all(isinstance(a, str) for a in archs):
            raise ValueError(f"ivl_base_architectures must be a non-empty list of class names, got {archs!r}")
        real = get("ivl_real_vocab")
        if real is not None and (not is_int(real) or real < 1):
            raise ValueError(f"ivl_real_vocab must be a positive integer or null, got {real!r}")
        return cls(get("ivl_base"), get("ivl_value"), float(alpha), tuple(archs), real)


def export_pair(base, value, out, *, alpha: float = 1.0) -> Path:
    """Write the vLLM pair directory ``out`` for the checkpoints ``base`` and ``value`` (see the module
    docstring); returns it. ``out`` must not exist or be an empty directory: it is written next to its place and
    renamed into it (into an existing empty directory, file by file, config.json last), so a failure leaves
    nothing behind."""
    from ..decode.model_set import common_vocab
    from ..decode.options import pair_generation_config, read_generation_config
    from ..models.checkpoint import checkpoint_dir, read_config, weight_files
    from ..safe_output import UnsafeOutputError, check_output_location
    from ..schemes import scheme_of_checkpoint
    from ..tokenizer_identity import pick_tokenizers, tokenizer_size

    check_finite(alpha, "alpha")
    base_dir = checkpoint_dir(base, what="base").resolve()
    value_dir = checkpoint_dir(value, what="value").resolve()
    scheme = scheme_of_checkpoint(value_dir)
    if scheme != "residual":
        raise NotImplementedError(
            f"the value network {str(value)!r} is a {scheme!r} one (its ivl.json): it reads the base's "
            + ("hidden state" if scheme == "probe" else "distribution")
            + ", which vLLM's model classes do not pass between models; serve it with `ivl-fast serve`"
        )
    configs = {}
    for name, path in (("base", base_dir), ("value", value_dir)):
        weight_files(path)  # safetensors only (a pickled checkpoint: ValueError naming it)
        cfg = read_config(path)
        quant = cfg.get("quantization_config")
        if quant is not None:
            method = quant.get("quant_method") if isinstance(quant, dict) else quant
            raise NotImplementedError(
                f"the {name} checkpoint {str(path)!r} is quantized ({method!r}): quantized pairs are not supported "
                "on vLLM yet"
            )
        if not cfg.get("architectures"):
            raise ValueError(f"the {name} checkpoint's config.json names no architectures (vLLM builds by them)")
        configs[name] = cfg
    if configs["base"]["architectures"] == [ARCHITECTURE]:
        raise ValueError(f"--base {str(base)!r} is itself an exported pair directory; give the base checkpoint")
    rows = {name: _text_config(cfg).get("vocab_size") for name, cfg in configs.items()}
    try:
        tok, sides = pick_tokenizers(None, base_dir, value_dir, rows["base"], rows["value"])
    except ValueError as e:
        raise ValueError(f"{e}. {_CROSS_VOCAB_HINT}") from None
    if tok is None:
        raise ValueError(
            f"neither {str(base)!r} nor {str(value)!r} has tokenizer files: vLLM needs the pair's tokenizer"
        )
    real_vocab = common_vocab([rows["base"], rows["value"]], tokenizer_size(tok))
    gen, _ = pair_generation_config(
        [("value", read_generation_config(value_dir)), ("base", read_generation_config(base_dir))],
        list(sides.items()),
        real_vocab or rows["value"],
    )

    target = check_output_location(out, {"--base": base_dir, "--value": value_dir})
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise UnsafeOutputError(f"--out {str(out)!r} exists and is not an empty directory; choose a new one")
    config = dict(configs["base"])
    config["architectures"] = [ARCHITECTURE]
    spec = PairSpec(str(base_dir), str(value_dir), float(alpha), tuple(configs["base"]["architectures"]), real_vocab)
    config.update(spec.to_config())
    value_ctx, base_ctx = _context(configs["value"]), _context(configs["base"])
    if value_ctx is not None and (base_ctx is None or value_ctx < base_ctx):
        config["max_sequence_length"] = value_ctx

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    moved: list[Path] = []
    try:
        _write(tmp, config, tok, gen)
        if not target.exists():
            os.replace(tmp, target)
            return target
        # an empty directory the caller made stays theirs: the files move into it, config.json last (vLLM reads a
        # directory without one as no model), and only what this call wrote is removed if a move fails
        for f in sorted(tmp.iterdir(), key=lambda f: f.name == "config.json"):
            os.replace(f, target / f.name)
            moved.append(target / f.name)
        tmp.rmdir()
    except BaseException:
        for f in moved:
            f.unlink(missing_ok=True)
        _remove_tree(tmp)
        raise
    return target


def _text_config(cfg: dict) -> dict:
    """The language model's part of a config.json (multimodal checkpoints nest it as ``text_config``)."""
    return cfg.get("text_config") or cfg


def _context(cfg: dict) -> int | None:
    n = _text_config(cfg).get("max_position_embeddings")
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


def _write(d: Path, config: dict, tok, gen) -> None:
    import torch
    from safetensors.torch import save_file

    from ..chat import DEFAULT_CHAT_TEMPLATE

    (d / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if not getattr(tok, "chat_template", None):  # what `ivl-fast serve` renders chats with, written out for vLLM
        tok.chat_template = DEFAULT_CHAT_TEMPLATE
    tok.save_pretrained(str(d))
    if gen is not None:
        gen.save_pretrained(str(d))
    save_file({"ivl.format": torch.tensor([FORMAT], dtype=torch.int32)}, str(d / MARKER), metadata={"format": "pt"})


def _remove_tree(d: Path) -> None:
    """Remove the temporary directory this module made (and only that)."""
    import shutil

    shutil.rmtree(d, ignore_errors=True)


__all__ = ["ARCHITECTURE", "FORMAT", "MARKER", "PairSpec", "export_pair"]
