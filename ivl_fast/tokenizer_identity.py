"""What decoding uses of a tokenizer, so two checkpoints' tokenizers compare by what matters, not by class.

Same-vocabulary IVL decodes with one tokenizer for both models, which is right when both directories' tokenizers
give every token the model can feed or produce the same id and agree on the special ids. Comparing
``get_vocab()`` asks more than that and refuses identical files: ``AutoTokenizer`` picks the tokenizer class from
each directory's ``config.json``, and a class may add tokens of its own (transformers' ``Qwen2Tokenizer`` adds
``<|endoftext|>`` as pad/unk when ``tokenizer_config.json`` names none), past the last row of the model's logits.

:class:`TokenizerIdentity` is that comparable part: the token -> id map over ``[0, vocab_size)`` of the model,
and the bos/eos/pad/unk ids (an id outside the model's vocabulary counts as none: no such token can be fed or
produced). :func:`describe_difference` says in a sentence what differs between two identities;
:func:`pick_tokenizer` is how ``FastIVLDecoder.from_pretrained`` chooses the tokenizer of a base/value pair.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from .chat import has_tokenizer, load_tokenizer

SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")

_HINT = "for different tokenizers build a map with `ivl-fast vocab-map`"


@dataclass(frozen=True)
class TokenizerIdentity:
    """The part of a tokenizer that decoding relies on; equal identities decode interchangeably.

    ``tokens``: (token, id) pairs with ``id < vocab_size``, sorted by id then token (see :attr:`token_to_id`).
    ``bos_token_id`` / ``eos_token_id`` / ``pad_token_id`` / ``unk_token_id``: the tokenizer's ids, None when it
    has none or its id lies outside ``[0, vocab_size)``. ``vocab_size``: the number of ids counted (the model's
    vocabulary; None: every token of the tokenizer); it does not take part in comparisons, so one tokenizer
    describes itself the same under two models whose embeddings are padded to different sizes.
    """

    tokens: tuple[tuple[str, int], ...]
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    unk_token_id: int | None = None
    vocab_size: int | None = field(default=None, compare=False)

    @classmethod
    def of(cls, tokenizer, vocab_size: int | None = None) -> TokenizerIdentity:
        """The identity of a ``transformers`` tokenizer over the ids ``[0, vocab_size)`` of a model (None: all)."""
        if vocab_size is not None and not (_is_int(vocab_size) and vocab_size > 0):
            raise ValueError(f"vocab_size must be a positive integer or None, got {vocab_size!r}")

        def counted(i) -> bool:
            return _is_int(i) and i >= 0 and (vocab_size is None or i < vocab_size)

        tokens = tuple(sorted(((t, i) for t, i in tokenizer.get_vocab().items() if counted(i)), key=lambda p: p[::-1]))
        special = {}
        for name in SPECIAL_IDS:
            i = getattr(tokenizer, name, None)
            special[name] = int(i) if counted(i) else None
        return cls(tokens, **special, vocab_size=vocab_size)

    @property
    def token_to_id(self) -> MappingProxyType:
        """The token -> id map (read-only)."""
        return MappingProxyType(dict(self.tokens))


def describe_difference(a: TokenizerIdentity, b: TokenizerIdentity, names=("base", "value")) -> str | None:
    """None when ``a`` and ``b`` are the same identity; else one short sentence saying what differs, e.g.
    "the value tokenizer maps 'Ġthe' to 262, the base tokenizer to 263; 12 more tokens differ" or
    "eos_token_id: base 2, value 0". ``names`` are what to call ``a`` and ``b``."""
    if a == b:
        return None
    na, nb = names
    parts = []
    ma, mb = a.token_to_id, b.token_to_id
    differing = [t for t in ma.keys() | mb.keys() if ma.get(t) != mb.get(t)]
    if differing:
        # the differing token of the lowest id first (on a tie: the one that has it in ``a``), so the sentence
        # is the same from run to run
        def order(t):
            ia, ib = ma.get(t), mb.get(t)
            low = min(i for i in (ia, ib) if i is not None)
            return low, ia != low, t

        first = min(differing, key=order)
        ia, ib = ma.get(first), mb.get(first)
        if ia is not None and ib is not None:
            parts.append(f"the {nb} tokenizer maps {first!r} to {ib}, the {na} tokenizer to {ia}")
        elif ia is not None:
            parts.append(f"the {na} tokenizer maps {first!r} to {ia}, the {nb} tokenizer has no such token")
        else:
            parts.append(f"the {nb} tokenizer maps {first!r} to {ib}, the {na} tokenizer has no such token")
        more = len(differing) - 1
        if more:
            parts.append(f"{more} more token{'s' if more > 1 else ''} differ{'' if more > 1 else 's'}")
    for name in SPECIAL_IDS:
        ia, ib = getattr(a, name), getattr(b, name)
        if ia != ib:
            parts.append(f"{name}: {na} {_id_text(ia)}, {nb} {_id_text(ib)}")
    return "; ".join(parts)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _id_text(i: int | None) -> str:
    return "none" if i is None else str(i)


def pick_tokenizer(explicit, base_path, value_path, base_vocab_size=None, value_vocab_size=None):
    """The one tokenizer of a same-vocabulary base/value pair.

    ``explicit`` (a directory, or a tokenizer object) wins. Otherwise: the tokenizer of the first of
    ``base_path``, ``value_path`` (either may be None) that has tokenizer files, or None when neither has. When both
    have, their :class:`TokenizerIdentity` over each model's vocabulary must be equal, else ValueError naming the
    difference. ``base_vocab_size`` / ``value_vocab_size``: the models' vocabulary sizes; None reads
    ``vocab_size`` from the directory's ``config.json`` (every token counts when it has none).
    """
    if explicit is not None:
        return load_tokenizer(explicit) if isinstance(explicit, str | Path) else explicit
    sides = ((base_path, base_vocab_size), (value_path, value_vocab_size))
    found = [(p, n) for p, n in sides if p is not None and has_tokenizer(p)]
    if not found:
        return None
    tok = load_tokenizer(found[0][0])
    if len(found) == 2:
        other = load_tokenizer(found[1][0])
        (pa, na), (pb, nb) = found
        a, b = TokenizerIdentity.of(tok, _vocab_size(pa, na)), TokenizerIdentity.of(other, _vocab_size(pb, nb))
        diff = describe_difference(a, b)
        if diff is not None:
            raise ValueError(
                f"the tokenizers of {str(base_path)!r} and {str(value_path)!r} differ over the models' vocabulary: "
                f"{diff}; same-vocabulary IVL needs one tokenizer ({_HINT})"
            )
    return tok


def _vocab_size(path, given: int | None) -> int | None:
    """``given``, else the ``vocab_size`` of ``path/config.json``, else None."""
    if given is not None:
        return given
    try:
        cfg = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    n = cfg.get("vocab_size") if isinstance(cfg, dict) else None
    return n if _is_int(n) and n > 0 else None


__all__ = ["SPECIAL_IDS", "TokenizerIdentity", "describe_difference", "pick_tokenizer"]


def checkpoint_tokenizers(tokenizer, base_path, value_path, base, value, vocab_map):
    """(tokenizer, base_tokenizer) of a decoder loaded from checkpoint directories: with a vocab map each model
    keeps its own (``tokenizer``: the value's, or the one given); else the pair's one tokenizer
    (:func:`pick_tokenizer`; a tokenizer object given is used as is) and no base tokenizer."""
    if vocab_map is not None:  # two vocabularies
        if tokenizer is None or isinstance(tokenizer, str | Path):
            tokenizer = load_tokenizer(tokenizer or value_path)
        return tokenizer, load_tokenizer(base_path)
    if tokenizer is None or isinstance(tokenizer, str | Path):
        tokenizer = pick_tokenizer(
            tokenizer,
            base_path,
            value_path,
            base_vocab_size=base.vocab_size if base is not None else None,
            value_vocab_size=value.vocab_size if value is not None else None,
        )
    return tokenizer, None
