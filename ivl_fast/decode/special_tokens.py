"""The value's special tokens as a base with another tokenizer reads them (a chat template's markers, BOS, EOS).

Across vocabularies the base reads the prompt's text (:mod:`.cross_vocab`), rendered with the value's chat template.
Its special tokens are strings of the value's vocabulary ("<|begin_of_text|>", "[INST]", "<|eot_id|>"); a base
tokenizer that does not hold a string as a token of its own would read it as characters. The rule, per special
token of the value tokenizer:

1. the base holds the same string as an added or special token: kept (it reads it as that token; e.g. Mistral's
   "[INST]" between tekken and the v3 SentencePiece tokenizer);
2. else it is the value's token of a role (BOS, EOS, UNK, PAD, SEP, CLS, MASK) that the base tokenizer fills:
   replaced by the base's token of that role ("<|begin_of_text|>" -> "<s>");
3. else it stays text: the base reads its characters. That is how a base of the older family reads such a marker
   (Mistral v1's SentencePiece tokenizer reads "[INST]" as text, as Mistral-7B-Instruct-v0.1 was trained); it is
   listed in :attr:`SpecialTokenTranslation.as_text`, and ``strict=True`` refuses it instead.

A BOS the base does not use (no BOS token) is dropped. Role markers with other names in the two families (Llama 3's
"<|start_header_id|>" against ChatML's "<|im_start|>") have no role in the tokenizers to map them by: they stay
text (3).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ROLES = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


def _added_strings(tokenizer) -> set[str]:
    """Strings the tokenizer holds as added or special tokens (it reads each as one token)."""
    out = {str(t) for t in getattr(tokenizer, "all_special_tokens", None) or []}
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    out |= {getattr(t, "content", str(t)) for t in decoder.values()}
    return {s for s in out if s}


@dataclass(frozen=True)
class SpecialTokenTranslation:
    """``mapping``: value special string -> what the base reads instead (its own token's string, or "" when
    dropped), only for strings that change; ``as_text``: value specials the base reads as characters."""

    mapping: dict[str, str]
    as_text: tuple[str, ...]

    @classmethod
    def between(cls, tokenizer, base_tokenizer, *, strict: bool = False) -> SpecialTokenTranslation:
        """The translation from the value's ``tokenizer`` to ``base_tokenizer`` (the module docstring's rule).
        ``strict``: refuse (ValueError naming them) value specials the base would read as text."""
        value_specials = set()
        decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
        value_specials |= {t.content for t in decoder.values() if getattr(t, "special", False)}
        value_specials |= {str(t) for t in getattr(tokenizer, "all_special_tokens", None) or []}
        base_has = _added_strings(base_tokenizer)
        mapping, as_text = {}, []
        for s in sorted(value_specials):
            if not s or s in base_has:
                continue  # (1) the base reads it as its own token
            roles = [r for r in ROLES if getattr(tokenizer, r, None) == s]
            twin = next((getattr(base_tokenizer, r, None) for r in roles if getattr(base_tokenizer, r, None)), None)
            if twin is not None:
                mapping[s] = str(twin)  # (2) the base's token of the same role
            elif "bos_token" in roles:
                mapping[s] = ""  # a BOS the base does not use
            else:
                as_text.append(s)  # (3)
        if strict and as_text:
            raise ValueError(
                f"the base tokenizer has no counterpart of the value's special tokens {as_text}: it would read them "
                "as text"
            )
        return cls(mapping, tuple(as_text))

    def translate(self, text: str) -> str:
        """``text`` (rendered with the value's template) with the value's special tokens replaced by the base's."""
        if not self.mapping:
            return text
        pattern = re.compile("|".join(re.escape(s) for s in sorted(self.mapping, key=len, reverse=True)))
        return pattern.sub(lambda m: self.mapping[m.group(0)], text)


__all__ = ["ROLES", "SpecialTokenTranslation"]
