"""The value's special tokens as the base reads them across vocabularies (ivl_fast.decode.special_tokens), on real
tokenizer families: mistral-common's tekken (131072 byte-level tokens, "[INST]" a control token) against its v1
(32000 SentencePiece tokens, "[INST]" text) and v3 (32768, "[INST]" a control token) tokenizers; the demo's pair;
and a Llama-3-style renamed BOS/EOS.

The mistral-common tokenizers are converted by bench/mistral_tokenizers.py into IVL_TEST_TOKENIZERS (.ci/run does
it in a venv of its own); without them those tests skip, unless IVL_REQUIRE_TEST_TOKENIZERS=1 (CI) makes that a
failure.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ivl_fast.chat import load_tokenizer
from ivl_fast.decode.cross_vocab import Retokenizer
from ivl_fast.decode.special_tokens import SpecialTokenTranslation


def _mistral(name: str):
    root = os.environ.get("IVL_TEST_TOKENIZERS")
    path = Path(root) / name if root else None
    if path is None or not path.is_dir():
        if os.environ.get("IVL_REQUIRE_TEST_TOKENIZERS") == "1":
            pytest.fail(f"IVL_TEST_TOKENIZERS does not hold {name} (bench/mistral_tokenizers.py writes it)")
        pytest.skip("set IVL_TEST_TOKENIZERS to bench/mistral_tokenizers.py's output")
    return load_tokenizer(path)


def _reads(value_tok, base_tok, text: str) -> list[str]:
    """The base's tokens of a prompt the value's template rendered (what a cross-vocabulary decode feeds it)."""
    rt = Retokenizer(value_tok, base_tok, [[1]], [text], False, 10_000)
    return base_tok.convert_ids_to_tokens(rt.base_ctx[0])


def test_mistral_control_tokens_reach_each_base_as_it_reads_them():
    tekken, v1, v3 = _mistral("tekken_240911"), _mistral("tokenizer_v1"), _mistral("tokenizer_v3")
    msgs = [{"role": "user", "content": "Where?"}]
    prompt = tekken.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert prompt == "<s>[INST]Where?[/INST]"
    # v3 holds [INST] / [/INST] as control tokens: the base reads each as one token, after one BOS
    to_v3 = SpecialTokenTranslation.between(tekken, v3)
    assert to_v3.translate(prompt) == prompt and "[INST]" not in to_v3.as_text
    got = _reads(tekken, v3, prompt)
    assert got[:2] == ["<s>", "[INST]"] and got[-1] == "[/INST]" and got.count("<s>") == 1
    # v1 has no such tokens: they reach it as text (as Mistral-7B-Instruct-v0.1 read them), and are listed
    to_v1 = SpecialTokenTranslation.between(tekken, v1)
    assert {"[INST]", "[/INST]"} <= set(to_v1.as_text) and "<s>" not in to_v1.as_text
    got = _reads(tekken, v1, prompt)
    assert got[0] == "<s>" and got.count("<s>") == 1 and "[INST]" not in got and len(got) > 6
    assert v1.decode(v1.convert_tokens_to_ids(got), skip_special_tokens=True).replace(" ", "") == "[INST]Where?[/INST]"
    with pytest.raises(ValueError, match=r"no counterpart of the value's special tokens .*\[INST\]"):
        SpecialTokenTranslation.between(tekken, v1, strict=True)


def test_a_renamed_bos_and_eos_are_read_by_role(tokenizer):
    """A Llama-3-style value tokenizer (BOS "<|begin_of_text|>", EOS "<|eot_id|>", a marker "<|start_header_id|>")
    against the conftest BPE (BOS "<s>", EOS "</s>"): BOS and EOS become the base's, the marker stays text."""
    from tokenizers import AddedToken, Tokenizer
    from transformers import PreTrainedTokenizerFast

    value = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tokenizer.backend_tokenizer.to_str()))
    value.add_special_tokens(
        {
            "bos_token": "<|begin_of_text|>",
            "eos_token": "<|eot_id|>",
            "additional_special_tokens": [AddedToken("<|start_header_id|>", special=True)],
        }
    )
    tr = SpecialTokenTranslation.between(value, tokenizer)
    assert tr.mapping == {"<|begin_of_text|>": "<s>", "<|eot_id|>": "</s>"}
    assert tr.as_text == ("<|start_header_id|>",)
    text = "<|begin_of_text|><|start_header_id|>user\nHi<|eot_id|>"
    assert tr.translate(text) == "<s><|start_header_id|>user\nHi</s>"
    got = _reads(value, tokenizer, text)
    assert got[0] == "<s>" and got.count("<s>") == 1 and got[-1] == "</s>"


def test_the_demo_pair_shares_its_special_tokens():
    """The demo's two tokenizers (byte-level BPE a, SentencePiece-style b) name BOS/EOS/UNK/PAD alike: nothing to
    translate, nothing read as text."""
    from ivl_fast.demo import DemoConfig, make_tokenizers, make_world, pretraining_text

    cfg = DemoConfig(quick=True)
    world = make_world(cfg.n_people, cfg.seed)
    tok_a, tok_b = make_tokenizers(cfg, pretraining_text(world, world["people"], 6, cfg.seed))
    tr = SpecialTokenTranslation.between(tok_a, tok_b)
    assert tr.mapping == {} and tr.as_text == ()
    assert _reads(tok_a, tok_b, "<s><|user|>\nWhere?\n<|assistant|>\n")[0] == "<s>"


def test_a_chat_given_as_ids_alone_reaches_the_base_with_its_markers():
    """Ids alone (no text) of a chat rendered with control tokens (v3's "[INST]"/"[/INST]", special tokens there; the
    EOS between turns): prompt_text gives back the rendered string, so the base reads them as it reads the rendered
    text; the decoding without special tokens would hand the base a chat without any marker. Plain ids (a leading
    BOS at most) read as plain text, the base adding its own BOS."""
    from ivl_fast.decode.cross_vocab import prompt_text

    tekken, v1, v3 = _mistral("tekken_240911"), _mistral("tokenizer_v1"), _mistral("tokenizer_v3")
    rendered = "<s>[INST] Where? [/INST] Here.</s>[INST] Why? [/INST]"
    ids = v3(rendered, add_special_tokens=False)["input_ids"]
    assert v3.convert_ids_to_tokens(ids)[:2] == ["<s>", "[INST]"]
    assert "[INST]" not in v3.decode(ids, skip_special_tokens=True)  # the markers a plain decoding drops
    assert prompt_text(v3, ids) == rendered
    got = _reads(v3, tekken, prompt_text(v3, ids))
    assert got.count("[INST]") == 2 and got.count("</s>") == 1 and got.count("<s>") == 1
    plain = v3("Where is it?")["input_ids"]
    assert prompt_text(v3, plain) == "Where is it?"
    assert _reads(v3, v1, prompt_text(v3, plain)) == v1.convert_ids_to_tokens(v1("Where is it?")["input_ids"])


def _legacy_sentencepiece(v1, tmp_path):
    """v1 in the tokenizer.json layout Llama-2-chat-hf and Mistral-7B-v0.1 ship (legacy: a Prepend("▁") + Replace
    normalizer, no pre-tokenizer, "<s> $A" added), which marks the start of every piece after a special token with
    "▁"."""
    import json

    from transformers import PreTrainedTokenizerFast

    j = json.loads(v1.backend_tokenizer.to_str())
    j["normalizer"] = {
        "type": "Sequence",
        "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        ],
    }
    j["pre_tokenizer"] = None
    j["post_processor"] = {  # "<s> $A", as Llama 2's file adds its BOS
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [v1.bos_token_id], "tokens": ["<s>"]}},
    }
    (tmp_path / "legacy.json").write_text(json.dumps(j))
    return PreTrainedTokenizerFast(
        tokenizer_file=str(tmp_path / "legacy.json"), bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def test_a_legacy_sentencepiece_chat_given_as_ids_reads_as_rendered(tmp_path):
    """Llama 2's chat template rendered for a legacy SentencePiece tokenizer, two turns: its ids decode, special
    tokens kept, with a space after each special token (the "▁" the tokenizer put there); prompt_text gives back
    the rendered string (the pieces between special tokens decoded each alone, which encodes back to the ids), and
    each base (tekken, v3) reads the ids alone token for token as it reads the rendered string."""
    from ivl_fast.decode.cross_vocab import prompt_text

    tekken, v3 = _mistral("tekken_240911"), _mistral("tokenizer_v3")
    legacy = _legacy_sentencepiece(_mistral("tokenizer_v1"), tmp_path)
    rendered = "<s>[INST] Where? [/INST] Here. </s><s>[INST] Why? [/INST]"
    ids = legacy(rendered, add_special_tokens=False)["input_ids"]
    assert legacy.convert_ids_to_tokens(ids)[:2] == ["<s>", "▁["]  # the mark after the special token
    assert legacy("Where?")["input_ids"][0] == legacy.bos_token_id  # it adds its BOS to a plain text
    assert legacy.decode(ids, skip_special_tokens=False) != rendered  # the whole decoding keeps it
    assert prompt_text(legacy, ids) == rendered
    for base in (tekken, v3):
        assert _reads(legacy, base, prompt_text(legacy, ids)) == _reads(legacy, base, rendered)


def test_ids_alone_of_a_tokenizer_without_bos(tokenizer):
    """A value tokenizer without BOS (Qwen's): an empty context reads its EOS (lm-eval's prefix token), and that
    alone, or followed by plain text, reads as plain text (the base adds its own BOS), not as "</s>"; an EOS
    between two texts is a special token past the prefix: it reaches the base as its EOS."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from ivl_fast.decode.cross_vocab import prompt_text

    value = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tokenizer.backend_tokenizer.to_str()), eos_token="</s>"
    )
    assert value.bos_token_id is None
    eos = value.eos_token_id
    words = value("The for statement", add_special_tokens=False)["input_ids"]
    assert prompt_text(value, [eos]) == ""
    assert _reads(value, tokenizer, prompt_text(value, [eos])) == ["<s>"]
    assert prompt_text(value, [eos, *words]) == "The for statement"
    assert prompt_text(value, [*words, eos, *words]) == "The for statement</s>The for statement"
    assert _reads(value, tokenizer, prompt_text(value, [*words, eos, *words])).count("</s>") == 1


def test_a_single_chat_turn_with_text_markers_given_as_ids_reads_as_plain_text():
    """The documented limit of prompt_text: the demo's template writes its role markers as text ("<|user|>"), so a
    single turn's ids hold no special token past the BOS and look like plain text; they read without the BOS text
    (the base adds its BOS and, SentencePiece-style, a word-start mark), unlike its rendered string: pass texts."""
    from ivl_fast.decode.cross_vocab import prompt_text
    from ivl_fast.demo import DemoConfig, make_tokenizers, make_world, pretraining_text

    cfg = DemoConfig(quick=True)
    world = make_world(cfg.n_people, cfg.seed)
    tok_a, tok_b = make_tokenizers(cfg, pretraining_text(world, world["people"], 6, cfg.seed))
    rendered = "<s><|user|>\nWhere?\n<|assistant|>\n"
    ids = tok_a(rendered, add_special_tokens=False)["input_ids"]
    assert prompt_text(tok_a, ids) == rendered[len("<s>") :]
    assert _reads(tok_a, tok_b, prompt_text(tok_a, ids)) != _reads(tok_a, tok_b, rendered)


def test_ids_alone_that_no_text_encodes_to_read_as_their_whole_decoding(tokenizer):
    """Ids holding a special token (an EOS between two texts) whose other tokens are not the tokenizer's own
    tokenization ("The" as three characters): neither the whole decoding nor the pieces' encodes back to them; the
    base reads the whole decoding, special token included."""
    from ivl_fast.decode.cross_vocab import prompt_text

    chars = [tokenizer.convert_tokens_to_ids(c) for c in "The"]
    assert tokenizer("The", add_special_tokens=False)["input_ids"] != chars  # not its own tokenization
    ids = [*chars, tokenizer.eos_token_id, *chars]
    assert prompt_text(tokenizer, ids) == tokenizer.decode(ids, skip_special_tokens=False) == "The</s>The"
