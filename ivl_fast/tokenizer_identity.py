"""What decoding uses of a tokenizer, so two checkpoints' tokenizers compare by what matters, not by class.

Same-vocabulary IVL decodes with one tokenizer for both models, which is right when both directories' tokenizers
give every token both models can feed or produce the same id (the ids below both models' row counts: one
tokenizer under embeddings padded to different sizes, Qwen2.5 0.5B's 151,936 rows and 7B's 152,064, is one
vocabulary). Special-token roles (bos, eos, pad, unk) may differ, as between a base and its Instruct model; the
decoder then stops at the EOS ids of both. Comparing
``get_vocab()`` asks more than that and refuses identical files: ``AutoTokenizer`` picks the tokenizer class from
each directory's ``config.json``, and a class may add tokens of its own (transformers' ``Qwen2Tokenizer`` adds
``<|endoftext|>`` as pad/unk when ``tokenizer_config.json`` names none), past the last row of the model's logits.

:class:`TokenizerIdentity` is that comparable part: the token -> id map over ``[0, vocab_size)`` of the model,
and the bos/eos/pad/unk ids (an id outside the model's vocabulary counts as none: no such token can be fed or
produced). :func:`describe_difference` says in a sentence what differs between two identities;
:func:`pick_tokenizer` is how ``FastIVLDecoder.from_pretrained`` chooses the tokenizer of a base/value pair;
:func:`tokenizer_size` is where a model's padding rows start.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from .chat import has_tokenizer, load_tokenizer
from .checks import is_int

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
        if vocab_size is not None and not (is_int(vocab_size) and vocab_size > 0):
            raise ValueError(f"vocab_size must be a positive integer or None, got {vocab_size!r}")

        def counted(i) -> bool:
            return is_int(i) and i >= 0 and (vocab_size is None or i < vocab_size)

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


def _id_text(i: int | None) -> str:
    return "none" if i is None else str(i)


def pick_tokenizer(explicit, base_path, value_path, base_vocab_size=None, value_vocab_size=None):
    """The one tokenizer of a same-vocabulary base/value pair (:func:`pick_tokenizers`' first element)."""
    return pick_tokenizers(explicit, base_path, value_path, base_vocab_size, value_vocab_size)[0]


def pick_tokenizers(explicit, base_path, value_path, base_vocab_size=None, value_vocab_size=None):
    """(the one tokenizer of a same-vocabulary base/value pair, {"base" / "value": each directory's own tokenizer,
    for those that have one}).

    ``explicit`` (a directory, or a tokenizer object) wins (no comparison: the caller chose; no side's own is
    loaded). Otherwise: the tokenizer of the first of ``base_path``, ``value_path`` (either may be None) that has
    tokenizer files, or None when neither has. When both have, their token -> id maps must be the same over the
    ids both models have rows for (``min`` of the two sizes: one tokenizer under embeddings padded to different
    row counts is one vocabulary), else ValueError naming the difference. Special-token roles (bos, eos, pad,
    unk) may differ: the decoder stops at both sides' EOS (:func:`ivl_fast.decode.options.union_stop_ids`).
    ``base_vocab_size`` / ``value_vocab_size``: the models' vocabulary sizes; None reads ``vocab_size`` from the
    directory's ``config.json`` (every token counts when neither is known).
    """
    if explicit is not None:
        return (load_tokenizer(explicit) if isinstance(explicit, str | Path) else explicit), {}
    sides = (("base", base_path, base_vocab_size), ("value", value_path, value_vocab_size))
    found = [(name, p, n) for name, p, n in sides if p is not None and has_tokenizer(p)]
    if not found:
        return None, {}
    tok = load_tokenizer(found[0][1])
    own = {found[0][0]: tok}
    if len(found) == 2:
        other = load_tokenizer(found[1][1])
        own[found[1][0]] = other
        sizes = [_vocab_size(path, given) for _, path, given in found]
        known = [size for size in sizes if size is not None]
        common = min(known) if known else None  # the ids both models can read and produce
        a, b = TokenizerIdentity.of(tok, common), TokenizerIdentity.of(other, common)
        if a.tokens != b.tokens:  # special ids alone may differ (item: same family, other chat roles)
            raise ValueError(
                f"the tokenizers of {str(base_path)!r} and {str(value_path)!r} differ over the models' vocabulary: "
                f"{describe_difference(a, b)}; same-vocabulary IVL needs one tokenizer ({_HINT})"
            )
    return tok, own


def check_same_tokens(tokenizer, path, rows: int, what: str) -> None:
    """A further model of the run (a draft, a logit term) at ``path`` whose embedding has ``rows`` rows: when its
    directory has a tokenizer, it must map the ids ``[0, min(rows, tokenizer_size(tokenizer)))`` as ``tokenizer``
    does (ValueError naming ``what`` and the difference). Nothing to check without one of the two."""
    if tokenizer is None or path is None or not has_tokenizer(path):
        return
    n = min(rows, tokenizer_size(tokenizer))
    a, b = TokenizerIdentity.of(tokenizer, n), TokenizerIdentity.of(load_tokenizer(path), n)
    if a.tokens != b.tokens:
        raise ValueError(
            f"the tokenizer of {what} {str(path)!r} differs from the pair's: "
            f"{describe_difference(a, b, names=('pair', what))}; it must share the pair's tokenizer"
        )


def tokenizer_size(tokenizer) -> int | None:
    """The ids ``tokenizer`` can produce: one past its largest id, added tokens included (``len(tokenizer)``
    when ids are contiguous); None for no tokenizer. Rows of a model's embedding at or past it are padding
    (:func:`ivl_fast.decode.model_set.common_vocab`)."""
    if tokenizer is None:
        return None
    ids = [i for i in tokenizer.get_vocab().values() if is_int(i) and i >= 0]
    return max(ids) + 1 if ids else len(tokenizer)


def _vocab_size(path, given: int | None) -> int | None:
    """``given``, else the ``vocab_size`` of ``path/config.json``, else None."""
    if given is not None:
        return given
    try:
        cfg = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    n = cfg.get("vocab_size") if isinstance(cfg, dict) else None
    return n if is_int(n) and n > 0 else None


__all__ = [
    "SPECIAL_IDS",
    "TokenizerIdentity",
    "check_same_tokens",
    "describe_difference",
    "pick_tokenizer",
    "pick_tokenizers",
    "tokenizer_size",
]


def checkpoint_tokenizers(tokenizer, base_path, value_path, base, value, vocab_map):
    """(tokenizer, base_tokenizer) of a decoder loaded from checkpoint directories (see
    :func:`checkpoint_tokenizer_sides`)."""
    return checkpoint_tokenizer_sides(tokenizer, base_path, value_path, base, value, vocab_map)[:2]


def checkpoint_tokenizer_sides(tokenizer, base_path, value_path, base, value, vocab_map):
    """(tokenizer, base_tokenizer, sides) of a decoder loaded from checkpoint directories: with a vocab map each
    model keeps its own (``tokenizer``: the value's, or the one given); else the pair's one tokenizer
    (:func:`pick_tokenizers`; a tokenizer object given is used as is) and no base tokenizer. ``sides``: {"base" /
    "value": the directory's own tokenizer} of one vocabulary, where loaded (their EOS ids join the stop ids)."""
    if vocab_map is not None:  # two vocabularies
        if tokenizer is None or isinstance(tokenizer, str | Path):
            tokenizer = load_tokenizer(tokenizer or value_path)
        return tokenizer, load_tokenizer(base_path), {}
    sides = {}
    if tokenizer is None or isinstance(tokenizer, str | Path):
        tokenizer, sides = pick_tokenizers(
            tokenizer,
            base_path,
            value_path,
            base_vocab_size=base.vocab_size if base is not None else None,
            value_vocab_size=value.vocab_size if value is not None else None,
        )
    return tokenizer, None, sides
