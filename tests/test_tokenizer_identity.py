"""Tokenizer identity: two checkpoint directories share a tokenizer when it gives the models' tokens the same ids
and the same special ids, whatever class ``AutoTokenizer`` loads each as. Real transformers tokenizers and
configs throughout (the conftest BPE tokenizer, saved with ``save_pretrained`` next to a model config)."""

from __future__ import annotations

import re

import pytest
from conftest import build_model, swap_token_ids, tiny_config
from transformers import PreTrainedTokenizerFast

from ivl_fast import FastIVLDecoder
from ivl_fast.chat import load_tokenizer
from ivl_fast.tokenizer_identity import TokenizerIdentity, describe_difference, pick_tokenizer, pick_tokenizers

V = 512  # the conftest tokenizer's size and tiny_config's vocab_size


def _without_pad_unk(tokenizer):
    """The conftest tokenizer as a checkpoint with only bos/eos would ship it (no pad or unk named)."""
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, bos_token="<s>", eos_token="</s>")


def _save(tok, d, kind="llama", **config):
    d.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(d)
    tiny_config(kind, **config).save_pretrained(d)
    return d


@pytest.fixture
def qwen2_case(tmp_path, tokenizer):
    """Byte-identical tokenizer files under a Qwen2 base config and a Llama value config."""
    tok = _without_pad_unk(tokenizer)
    return _save(tok, tmp_path / "base", "qwen2"), _save(tok, tmp_path / "value", "llama")


def _same_files(a, b):
    names = sorted(p.name for p in a.iterdir() if p.name != "config.json")
    assert names == sorted(p.name for p in b.iterdir() if p.name != "config.json")
    return all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


# ----------------------------------------------------------------------------- the Qwen2 case


def test_the_qwen2_class_adds_a_token_to_identical_files(qwen2_case):
    # the bug's premise, with real objects: same files, different classes, get_vocab() differs by <|endoftext|>
    base_dir, value_dir = qwen2_case
    assert _same_files(base_dir, value_dir)
    base, value = load_tokenizer(base_dir), load_tokenizer(value_dir)
    assert type(base).__name__ == "Qwen2Tokenizer" and type(value).__name__ != "Qwen2Tokenizer"
    assert set(base.get_vocab()) - set(value.get_vocab()) == {"<|endoftext|>"}
    assert base.get_vocab()["<|endoftext|>"] == V  # past the model's last logit
    assert base.pad_token_id == base.unk_token_id == V and value.pad_token_id is None


def test_identical_files_under_different_model_types_are_accepted(qwen2_case):
    base_dir, value_dir = qwen2_case
    tok = pick_tokenizer(None, base_dir, value_dir, V, V)
    assert type(tok).__name__ == "Qwen2Tokenizer"  # the base directory's, as before
    # the vocabulary sizes default to config.json's
    assert type(pick_tokenizer(None, base_dir, value_dir)).__name__ == "Qwen2Tokenizer"


def test_the_qwen2_identity_drops_what_lies_past_the_vocabulary(qwen2_case):
    base, value = (load_tokenizer(d) for d in qwen2_case)
    a, b = TokenizerIdentity.of(base, V), TokenizerIdentity.of(value, V)
    assert a == b and hash(a) == hash(b) and describe_difference(a, b) is None
    assert len(a.tokens) == V and "<|endoftext|>" not in a.token_to_id
    assert (a.bos_token_id, a.eos_token_id, a.pad_token_id, a.unk_token_id) == (1, 2, None, None)
    # one more id and the added token counts: then the two differ, and say how
    wide = TokenizerIdentity.of(base, V + 1)
    assert wide.token_to_id["<|endoftext|>"] == V and wide.pad_token_id == wide.unk_token_id == V
    assert describe_difference(wide, b) == (
        "the base tokenizer maps '<|endoftext|>' to 512, the value tokenizer has no such token; "
        "pad_token_id: base 512, value none; unk_token_id: base 512, value none"
    )


def test_a_vocabulary_one_larger_counts_the_added_token_when_both_have_its_row(qwen2_case):
    base_dir, value_dir = qwen2_case
    # one model with a row for it, the other without: the ids both models have are one vocabulary (#31: padded
    # embeddings); the decoder never feeds or produces id 512 (ModelSet.real_vocab)
    assert type(pick_tokenizer(None, base_dir, value_dir, V + 1, V)).__name__ == "Qwen2Tokenizer"
    with pytest.raises(ValueError, match=r"'<\|endoftext\|>' to 512.*pad_token_id: base 512, value none"):
        pick_tokenizer(None, base_dir, value_dir, V + 1, V + 1)
    _save(load_tokenizer(value_dir), base_dir, "qwen2", vocab_size=V + 1)  # the same through config.json
    _save(load_tokenizer(value_dir), value_dir, "llama", vocab_size=V + 1)
    with pytest.raises(ValueError, match=r"'<\|endoftext\|>' to 512"):
        pick_tokenizer(None, base_dir, value_dir)


# ----------------------------------------------------------------------------- genuine differences


def test_swapped_token_ids_are_refused_naming_the_token(tmp_path, tokenizer):
    base_dir = _save(tokenizer, tmp_path / "base")
    value_dir = _save(tokenizer, tmp_path / "value")
    ta, tb = swap_token_ids(value_dir, 300, 301)
    assert load_tokenizer(value_dir).convert_tokens_to_ids(ta) == 301  # the edit took
    with pytest.raises(ValueError) as err:
        pick_tokenizer(None, base_dir, value_dir, V, V)
    msg = str(err.value)
    assert f"the value tokenizer maps {ta!r} to 301, the base tokenizer to 300; 1 more token differs" in msg
    assert re.search(r"tokenizers of .*base.* and .*value.* differ", msg)
    assert "for different tokenizers build a map with `ivl-fast vocab-map`" in msg
    assert "_token_id:" not in msg  # the special ids agree and are not mentioned


def test_a_different_eos_id_is_one_vocabulary(tmp_path, tokenizer):
    """Special-token roles alone may differ (#31: an Instruct base, a value network with its own EOS); the
    decoder stops at both EOS ids (tests/test_same_family_pairs.py)."""
    other_eos = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.backend_tokenizer,
        bos_token="<s>",
        eos_token="<pad>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    base_dir = _save(tokenizer, tmp_path / "base")
    value_dir = _save(other_eos, tmp_path / "value")
    tok, sides = pick_tokenizers(None, base_dir, value_dir, V, V)
    assert tok is sides["base"] and tok.eos_token_id == 2 and sides["value"].eos_token_id == 3
    a, b = (TokenizerIdentity.of(sides[k], V) for k in ("base", "value"))
    assert describe_difference(a, b) == "eos_token_id: base 2, value 3"  # what differs is still named
    # with the token map different as well, the refusal names both
    swap_token_ids(value_dir, 300, 301)
    with pytest.raises(ValueError, match=r"to 301, the base tokenizer to 300; 1 more token differs; eos_token_id: "):
        pick_tokenizer(None, base_dir, value_dir, V, V)


def test_tokens_past_the_model_vocabulary_are_ignored(tmp_path, tokenizer):
    base_dir = _save(tokenizer, tmp_path / "base")
    extra = load_tokenizer(base_dir)
    extra.add_tokens(["<extra_0>", "<extra_1>"])  # ids 512 and 513: no logits, no embeddings for them
    assert extra.convert_tokens_to_ids(["<extra_0>", "<extra_1>"]) == [V, V + 1]
    value_dir = _save(extra, tmp_path / "value")
    assert load_tokenizer(value_dir).get_vocab() != load_tokenizer(base_dir).get_vocab()
    assert pick_tokenizer(None, base_dir, value_dir, V, V) is not None
    assert pick_tokenizer(None, base_dir, value_dir) is not None  # config.json's vocab_size, 512
    # without config.json (and no sizes given) every token counts
    (base_dir / "config.json").unlink()
    (value_dir / "config.json").unlink()
    assert pick_tokenizer(None, base_dir, value_dir, V, V) is not None
    with pytest.raises(ValueError, match=r"the value tokenizer maps '<extra_0>' to 512"):
        pick_tokenizer(None, base_dir, value_dir)
    # rows for them in one model only: past the other's rows, not compared (the pair never uses them)
    assert pick_tokenizer(None, base_dir, value_dir, V, V + 2) is not None
    # both models have rows for them: then they count
    with pytest.raises(
        ValueError,
        match=r"the value tokenizer maps '<extra_0>' to 512, the base tokenizer has no "
        r"such token; 1 more token differs; same-vocabulary",
    ):
        pick_tokenizer(None, base_dir, value_dir, V + 2, V + 2)


# ----------------------------------------------------------------------------- the rest of the contract


def test_explicit_wins_and_one_directory_is_enough(tmp_path, tokenizer):
    base_dir = _save(tokenizer, tmp_path / "base")
    value_dir = _save(tokenizer, tmp_path / "value")
    swap_token_ids(value_dir, 300, 301)
    explicit = _save(tokenizer, tmp_path / "explicit")
    chosen = pick_tokenizer(str(explicit), base_dir, value_dir)  # no comparison: the caller chose
    assert chosen.get_vocab() == tokenizer.get_vocab()
    assert pick_tokenizer(explicit, base_dir, value_dir).get_vocab() == tokenizer.get_vocab()
    assert pick_tokenizer(tokenizer, base_dir, value_dir) is tokenizer
    swapped = load_tokenizer(value_dir).get_vocab()
    assert pick_tokenizer(None, None, value_dir).get_vocab() == swapped
    assert pick_tokenizer(None, base_dir, None).get_vocab() == tokenizer.get_vocab()
    bare = tmp_path / "bare"
    tiny_config().save_pretrained(bare)  # a checkpoint without tokenizer files
    assert pick_tokenizer(None, bare, value_dir).get_vocab() == swapped
    assert pick_tokenizer(None, base_dir, bare).get_vocab() == tokenizer.get_vocab()
    assert pick_tokenizer(None, bare, None) is None and pick_tokenizer(None, None, None) is None


def test_describe_difference_sentences():
    a = TokenizerIdentity((("<s>", 0), ("a", 1), ("b", 2), ("c", 3)), bos_token_id=0, eos_token_id=3, vocab_size=4)
    assert describe_difference(a, a) is None
    assert describe_difference(a, TokenizerIdentity(a.tokens, 0, 3, vocab_size=9)) is None  # size not compared
    swapped = TokenizerIdentity((("<s>", 0), ("b", 1), ("a", 2), ("c", 3)), bos_token_id=0, eos_token_id=3)
    assert describe_difference(a, swapped) == (
        "the value tokenizer maps 'a' to 2, the base tokenizer to 1; 1 more token differs"
    )
    assert describe_difference(a, swapped, names=("first", "second")) == (
        "the second tokenizer maps 'a' to 2, the first tokenizer to 1; 1 more token differs"
    )
    renamed = TokenizerIdentity((("<s>", 0), ("x", 1), ("y", 2), ("z", 3)), bos_token_id=1, eos_token_id=3)
    assert describe_difference(a, renamed) == (
        "the base tokenizer maps 'a' to 1, the value tokenizer has no such token; 5 more tokens differ; "
        "bos_token_id: base 0, value 1"
    )
    assert describe_difference(renamed, a, names=("b", "v")) == (  # on a tie of ids, the first side's token
        "the b tokenizer maps 'x' to 1, the v tokenizer has no such token; 5 more tokens differ; bos_token_id: b 1, v 0"
    )
    no_eos = TokenizerIdentity(a.tokens, bos_token_id=0)
    assert describe_difference(a, no_eos) == "eos_token_id: base 3, value none"


def test_identity_of_checks_its_vocab_size(tokenizer):
    assert len(TokenizerIdentity.of(tokenizer).tokens) == len(tokenizer.get_vocab())
    assert len(TokenizerIdentity.of(tokenizer, 100).tokens) == 100
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="vocab_size must be a positive integer"):
            TokenizerIdentity.of(tokenizer, bad)


# ----------------------------------------------------------------------------- through from_pretrained


def _checkpoint(tok, d, kind, seed):
    build_model(kind, seed=seed).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_from_pretrained_accepts_one_tokenizer_under_qwen2_and_llama(tmp_path, tokenizer):
    tok = _without_pad_unk(tokenizer)
    base_dir = _checkpoint(tok, tmp_path / "base", "qwen2", 0)
    value_dir = _checkpoint(tok, tmp_path / "value", "llama", 1)
    dec = FastIVLDecoder.from_pretrained(base_dir, value_dir)
    assert TokenizerIdentity.of(dec.tokenizer, V) == TokenizerIdentity.of(load_tokenizer(value_dir), V)


def test_from_pretrained_names_what_differs(tmp_path, tokenizer):
    base_dir = _checkpoint(tokenizer, tmp_path / "base", "llama", 0)
    value_dir = _checkpoint(tokenizer, tmp_path / "value", "llama", 1)
    ta, _ = swap_token_ids(value_dir, 300, 301)
    with pytest.raises(
        ValueError, match=re.escape(f"the value tokenizer maps {ta!r} to 301, the base tokenizer to 300")
    ):
        FastIVLDecoder.from_pretrained(base_dir, value_dir)
