"""The models of a decode and what follows from them (device, vocabulary, context): the one small value the
parts of :mod:`ivl_fast.decode` receive instead of reaching back into the decoder."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from ..checks import check_finite, is_number
from ..models.engine import all_support, supports
from ..schemes import is_cascade, is_probe, uses_base, value_is_engine


@dataclass(frozen=True)
class ModelSet:
    """scheme: one of :data:`ivl_fast.schemes.DECODE_SCHEMES`; base / value: engines (None when the scheme does not
    use one); alpha: weight of the value logits; vocab_map: a VocabMap when the vocabularies differ (sampling
    happens in the value vocabulary); sample_backend: combine_and_sample's backend option; terms: more
    same-vocabulary engines with signed weights, ((engine, weight), ...): logit arithmetic, z = z_base +
    alpha * z_value + sum_i w_i * z_i (proxy tuning: the value a tuned small model, a term its untuned self at -1;
    DExperts; EFT), each reading the tokens as a residual value network does. real_vocab: one tokenizer under
    models whose embeddings are padded to different row counts (Qwen2.5 0.5B-3B 151,936 rows, 7B-72B 152,064;
    Gemma-3 1B 262,144, 4B-27B 262,208): the ids ``[0, real_vocab)`` that exist for every model and the tokenizer
    (:func:`common_vocab`); every row at or past it is padding, never read, sampled or scored (:meth:`trim`).
    None: every model has the same rows (or a vocab map relates them), all of which count, as in transformers."""

    scheme: str
    base: object | None
    value: object | None
    alpha: float = 1.0
    vocab_map: object | None = None
    sample_backend: str = "auto"
    terms: tuple = ()
    real_vocab: int | None = None
    same_tokenizers: bool = False  # across vocabularies: both sides' tokenizers are identical (hashes agree)

    @classmethod
    def build(
        cls,
        scheme: str,
        base,
        value,
        *,
        alpha: float = 1.0,
        vocab_map=None,
        sample_backend: str = "auto",
        terms=(),
        tokenizer=None,
        base_tokenizer=None,
        draft=None,
    ) -> ModelSet:
        """Every check of how the engines pair (:func:`check_models`, :func:`check_vocab_map`,
        :func:`check_terms`), in one place, then the set. ``vocab_map``: a VocabMap or its file (loaded against the
        tokenizers); ``draft``: a draft model whose rows count toward the real vocabulary; ``tokenizer``: the value's
        (also the base's within one vocabulary), which tells padding rows from tokens."""
        from ..tokenizer_identity import tokenizer_size

        # one tokenizer under embeddings padded to different row counts (Qwen2.5 0.5B vs 7B, Gemma-3 1B vs 4B): the
        # real vocabulary is what every model has rows for and the tokenizer can produce (ModelSet.real_vocab)
        term_engines = [t[0] for t in terms or () if isinstance(t, tuple | list) and len(t) == 2]  # (checked below)
        rows = [e.vocab_size for e in (base, value, draft, *term_engines) if e is not None]
        real_vocab = None
        if vocab_map is None and len(set(rows)) > 1:
            real_vocab = common_vocab(rows, tokenizer_size(tokenizer))
        check_models(scheme, base, value, alpha, vocab_map is not None, real_vocab)
        same = False
        if vocab_map is not None:
            vocab_map, same = check_vocab_map(
                vocab_map, scheme=scheme, base=base, value=value, tokenizer=tokenizer, base_tokenizer=base_tokenizer
            )
        terms = check_terms(scheme, base, value, terms, vocab_map is not None, real_vocab)
        return cls(scheme, base, value, float(alpha), vocab_map, sample_backend, terms, real_vocab, same)

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
        """The range of token ids in and out: :attr:`real_vocab` when the models' rows differ, else the logits of
        the value model when there is one (else the base's)."""
        if self.real_vocab is not None:
            return self.real_vocab
        return (self.value or self.base).vocab_size

    def trim(self, z):
        """Logits [.., V_rows] of any model of the set (or None, or the value side's list with logit terms) -> the
        real vocabulary's [.., real_vocab]: a view (no copy; the fused kernel reads rows through their stride),
        dropping the padding rows, which then have probability 0 wherever the logits go (sampling, log-probs,
        top alternatives). Unchanged when every model has the same rows."""
        v = self.real_vocab
        if z is None or v is None:
            return z
        if isinstance(z, list):
            return [self.trim(x) for x in z]
        return z if z.shape[-1] == v else z[..., :v]

    def cascade_input(self, zb: torch.Tensor) -> torch.Tensor:
        """Base logits [.., V_base_rows] -> what the cascade value network's ``soft_embed`` reads: logits over its
        own embedding's rows [.., V_value_rows], softmax(z) @ E_value. With padded vocabularies the real ids keep
        the base's logits and every padding row of either model gets -inf (probability 0): one [.., V_value_rows]
        copy, on the cascade path only (it runs the two models one after the other anyway)."""
        v = self.real_vocab
        if v is None:
            return zb
        rows = self.value.vocab_size
        if rows == v:  # the value has no padding rows: the base's real ids, a view
            return zb[..., :v]
        out = zb.new_full((*zb.shape[:-1], rows), float("-inf"))
        out[..., :v] = zb[..., :v]
        return out

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


def common_vocab(rows, tokenizer_size: int | None) -> int | None:
    """The real vocabulary of models with ``rows`` embedding rows each sharing one tokenizer that knows
    ``tokenizer_size`` ids (:func:`ivl_fast.tokenizer_identity.tokenizer_size`): None when every model has the
    same rows (all of them count, as before) or the tokenizer is unknown (nothing tells padding from tokens: the
    checks then refuse the pair); else the ids every model has a row for and the tokenizer can produce,
    ``min(rows..., tokenizer_size)``."""
    rows = [int(r) for r in rows]
    if len(set(rows)) <= 1 or tokenizer_size is None:
        return None
    return min(*rows, int(tokenizer_size))


_PADDED_HINT = (
    "one tokenizer under embeddings padded to different sizes is one vocabulary: pass the tokenizer "
    "(tokenizer=..., or checkpoints that include it) and the rows past its ids are ignored"
)


def check_terms(scheme: str, base, value, terms, has_vocab_map: bool, real_vocab: int | None = None) -> tuple:
    """((engine, weight), ...) of logit terms that fit the pair (ValueError naming what does not). ``real_vocab``:
    see :class:`ModelSet` (a term's rows may then differ; it needs at least those ids)."""
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
        if not is_number(w) or not math.isfinite(w):
            raise ValueError(f"terms[{i}]: the weight must be a finite number, got {w!r}")
        padded = real_vocab is not None and e.vocab_size >= real_vocab
        if e.vocab_size != ref.vocab_size and not padded:
            raise ValueError(
                f"terms[{i}]: its vocabulary ({e.vocab_size} tokens) differs from the pair's ({ref.vocab_size}); "
                f"logit terms share one vocabulary ({_PADDED_HINT})"
            )
        if e.device != ref.device:
            raise ValueError(f"terms[{i}] is on {e.device} but the pair on {ref.device}")
    return tuple((e, float(w)) for e, w in terms)


def check_models(scheme: str, base, value, alpha, has_vocab_map: bool, real_vocab: int | None = None) -> None:
    """The engines fit the scheme and each other (ValueError naming what does not). ``real_vocab``: see
    :class:`ModelSet`; with it the base's and the value's rows may differ."""
    check_finite(alpha, "alpha")
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
        if base.vocab_size != value.vocab_size and not has_vocab_map and real_vocab is None:
            raise ValueError(
                f"base vocabulary ({base.vocab_size} tokens) and value vocabulary ({value.vocab_size} "
                f"tokens) differ, no tokenizer tells their padding rows apart and no vocab_map was given; "
                f"{_PADDED_HINT}; for different tokenizers build a map with `ivl-fast vocab-map "
                "--base-tokenizer BASE --value-tokenizer VALUE --corpus FILE --out map.safetensors`"
            )


def check_vocab_map(vocab_map, *, scheme: str, base, value, tokenizer, base_tokenizer):
    """A VocabMap (or its file) checked against the models and tokenizers -> (VocabMap, tokenizers identical)."""
    from pathlib import Path

    from ..models.engine import supports
    from ..vocab import VocabMap
    from ..vocab.build import tokenizer_hash

    if scheme != "residual":
        raise ValueError(f"cross-vocabulary decoding supports scheme='residual' only, got {scheme!r}")
    if not supports(base, "rewind"):
        raise ValueError("cross-vocabulary decoding needs the lean engine for the base (it rewinds its cache)")
    if tokenizer is None or base_tokenizer is None:
        raise ValueError("cross-vocabulary decoding needs both tokenizers (tokenizer=value's, base_tokenizer=)")
    if isinstance(vocab_map, str | Path):
        vocab_map = VocabMap.load(vocab_map, base_tokenizer=base_tokenizer, value_tokenizer=tokenizer)
    if not isinstance(vocab_map, VocabMap):
        raise TypeError(f"vocab_map must be a VocabMap or a path, got {type(vocab_map).__name__}")
    hashes = {"base": tokenizer_hash(base_tokenizer), "value": tokenizer_hash(tokenizer)}
    for side, h in hashes.items():
        want = (vocab_map.meta or {}).get(f"{side}_tokenizer_hash")
        if want and want != h:
            raise ValueError(
                f"vocab_map was built for another {side} tokenizer (hash {want[:12]}..., given {h[:12]}...)"
            )
    for side, tok, n in (("base", base_tokenizer, vocab_map.v_base), ("value", tokenizer, vocab_map.v_value)):
        if len(tok) > n:
            raise ValueError(f"the {side} tokenizer has {len(tok)} tokens but vocab_map covers {n}")
    if vocab_map.v_base > base.vocab_size or vocab_map.v_value > value.vocab_size:
        raise ValueError(
            f"vocab_map is [{vocab_map.v_base}, {vocab_map.v_value}] but the base model has "
            f"{base.vocab_size} and the value model {value.vocab_size} logits"
        )
    return vocab_map, hashes["base"] == hashes["value"]
