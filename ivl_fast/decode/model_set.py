"""The models of a decode and what follows from them (device, vocabulary, context): the one small value the
parts of :mod:`ivl_fast.decode` receive instead of reaching back into the decoder."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from ..models.engine import all_support, supports
from ..schemes import is_cascade, is_probe, uses_base, value_is_engine


@dataclass(frozen=True)
class ModelSet:
    """scheme: one of :data:`ivl_fast.schemes.DECODE_SCHEMES`; base / value: engines (None when the scheme does not
    use one); alpha: weight of the value logits; vocab_map: a VocabMap when the vocabularies differ (sampling
    happens in the value vocabulary); sample_backend: combine_and_sample's backend option; terms: more
    same-vocabulary engines with signed weights, ((engine, weight), ...): logit arithmetic, z = z_base +
    alpha * z_value + sum_i w_i * z_i (proxy tuning: the value a tuned small model, a term its untuned self at -1;
    DExperts; EFT), each reading the tokens as a residual value network does."""

    scheme: str
    base: object | None
    value: object | None
    alpha: float = 1.0
    vocab_map: object | None = None
    sample_backend: str = "auto"
    terms: tuple = ()

    @property
    def engines(self) -> list:
        """The engines a decode step runs (base first, then the value network, then the terms')."""
        return [
            m
            for m, used in ((self.base, uses_base(self.scheme)), (self.value, value_is_engine(self.scheme)))
            if used and m is not None
        ] + [e for e, _ in self.terms]

    @functools.cached_property
    def term_weights(self) -> torch.Tensor | None:
        """[M] fp32 on the models' device, made once (graph replays read it)."""
        if not self.terms:
            return None
        return torch.tensor([w for _, w in self.terms], dtype=torch.float32).to(self.device)

    @property
    def device(self) -> torch.device:
        return (self.base or self.value).device

    @property
    def vocab_size(self) -> int:
        """Logits of the value model when there is one (else the base's): the range of token ids in and out."""
        return (self.value or self.base).vocab_size

    @property
    def sampled_vocab(self) -> int:
        """Tokens sampling chooses from: the vocab map's value side across vocabularies (a value model's logits
        may be padded past it), else :attr:`vocab_size`."""
        return self.vocab_map.v_value if self.vocab_map is not None else self.vocab_size

    @property
    def max_context(self) -> int:
        return min(m.max_context for m in self.engines)

    @property
    def cross_vocab(self) -> bool:
        return self.vocab_map is not None

    @property
    def cascade(self) -> bool:
        return is_cascade(self.scheme)

    @property
    def probe(self) -> bool:
        """The value model is a probe on the base's final hidden state (scheme "probe")."""
        return is_probe(self.scheme)

    def all_support(self, capability: str) -> bool:
        return all_support(self.engines, capability)

    @property
    def config(self):
        """The config that supplies fallback special ids (the base's, else the value's)."""
        return (self.base or self.value).config


def check_terms(scheme: str, base, value, terms, has_vocab_map: bool) -> tuple:
    """((engine, weight), ...) of logit terms that fit the pair (ValueError naming what does not)."""
    terms = tuple(terms or ())
    if not terms:
        return ()
    if scheme not in ("residual", "base"):
        raise ValueError(f"logit terms need scheme 'residual' or 'base' (they read the tokens), got {scheme!r}")
    if has_vocab_map:
        raise ValueError("logit terms and a vocab_map cannot be combined (terms share the sampled vocabulary)")
    ref = value if value is not None else base
    for i, t in enumerate(terms):
        if not (isinstance(t, tuple | list) and len(t) == 2):
            raise ValueError(f"terms[{i}] must be a (model, weight) pair, got {t!r}")
        e, w = t
        if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w):
            raise ValueError(f"terms[{i}]: the weight must be a finite number, got {w!r}")
        if e.vocab_size != ref.vocab_size:
            raise ValueError(
                f"terms[{i}]: its vocabulary ({e.vocab_size} tokens) differs from the pair's ({ref.vocab_size}); "
                "logit terms share one vocabulary"
            )
        if e.device != ref.device:
            raise ValueError(f"terms[{i}] is on {e.device} but the pair on {ref.device}")
    return tuple((e, float(w)) for e, w in terms)


def check_models(scheme: str, base, value, alpha, has_vocab_map: bool) -> None:
    """The engines fit the scheme and each other (ValueError naming what does not)."""
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number, got {alpha!r}")
    if is_cascade(scheme) and not (supports(base, "inputs_embeds") and supports(value, "inputs_embeds")):
        raise ValueError(f"scheme={scheme!r} needs the lean engine for both models (Llama/Mistral/Qwen2)")
    from ..models.probe import ProbeValue

    if isinstance(value, ProbeValue) and not is_probe(scheme):
        raise ValueError(f"a probe value model decodes with scheme='probe' only, got scheme={scheme!r}")
    if is_probe(scheme):
        if not isinstance(value, ProbeValue):
            raise ValueError(
                f"scheme='probe' needs a probe value model (ivl-fast train --scheme probe), got {type(value).__name__}"
            )
        if not supports(base, "graphs") or not hasattr(base, "config"):
            raise ValueError("scheme='probe' needs the lean engine for the base (it returns its hidden state)")
        if has_vocab_map:
            raise ValueError("scheme='probe' reads the base's hidden state: it has the base's vocabulary, no vocab_map")
        value.check_base(base.config.hidden_size, base.vocab_size)
        if base.device != value.device:
            raise ValueError(f"base model is on {base.device} but the probe is on {value.device}")
        return
    if base is not None and value is not None:
        if base.device != value.device:
            raise ValueError(f"base model is on {base.device} but value model is on {value.device}")
        if base.vocab_size != value.vocab_size and not has_vocab_map:
            raise ValueError(
                f"base vocabulary ({base.vocab_size} tokens) and value vocabulary ({value.vocab_size} "
                "tokens) differ and no vocab_map was given; build one with `ivl-fast vocab-map "
                "--base-tokenizer BASE --value-tokenizer VALUE --corpus FILE --out map.safetensors`"
            )
