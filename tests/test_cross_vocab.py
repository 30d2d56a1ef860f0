"""Decoding across vocabularies: a value network on one tokenizer steering a base with another."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model

from ivl_fast import FastIVLDecoder
from ivl_fast.tiny import corpus_text, train_tokenizer
from ivl_fast.vocab import VocabMap

PROMPTS = ["The for statement is used", "A function definition", "x"]


@pytest.fixture(scope="module")
def setting(tokenizer):
    """value: the 512-token BPE of conftest; base: a 700-token BPE trained on more text (a real other vocab)."""
    base_tok = train_tokenizer(700, max_chars=150_000)
    vmap = VocabMap.build(base_tok, tokenizer, [corpus_text()[200_000:260_000]], top_k=3)
    base = build_model("llama", seed=0, vocab_size=len(base_tok), hidden_size=96, num_attention_heads=6)
    value = build_model("llama", seed=1, vocab_size=len(tokenizer))
    return base_tok, vmap, base, value


def test_base_context_always_decodes_to_the_text_so_far(setting, tokenizer):
    base_tok, vmap, base, value = setting
    dec = FastIVLDecoder(base, value, vmap, tokenizer=tokenizer, base_tokenizer=base_tok)
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    prompt, mask = dec._prepare_inputs(ids, None, 3)
    run = dec._make_run(prompt, mask, dec._options(None, max_new_tokens=24, eos_token_id=[]), 1, PROMPTS)
    rewound = 0
    for step_ids in run:
        assert step_ids.shape == (len(PROMPTS),) and int(step_ids.max()) < len(tokenizer)
        for r in range(len(PROMPTS)):
            assert run.base_context_text(r) == PROMPTS[r] + run.generated_text(r)
            # the base's cache holds exactly that context
            assert int(dec.base.seq_lens[r]) == len(run.base_ctx[r])
        rewound += 1
    assert rewound == 24


def test_generation_api_and_sampling_across_vocabularies(setting, tokenizer):
    base_tok, vmap, base, value = setting
    dec = FastIVLDecoder(base, value, vmap, tokenizer=tokenizer, base_tokenizer=base_tok)
    texts = dec.generate_text(PROMPTS, max_new_tokens=10, eos_token_id=[])
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    kw = dict(max_new_tokens=10, do_sample=True, temperature=0.9, top_k=30, seed=4, eos_token_id=[])
    a = dec.generate_text(PROMPTS, **kw)
    assert a == dec.generate_text(PROMPTS, **kw)
    # token ids are the value vocabulary's
    out = dec.generate([tokenizer(p)["input_ids"] for p in PROMPTS], max_new_tokens=5, eos_token_id=[])
    assert int(out.sequences.max()) < len(tokenizer)


def test_identity_map_between_identical_tokenizers_equals_same_vocab_decoding(tokenizer):
    base = build_model("llama", seed=0, hidden_size=96, num_attention_heads=6)
    value = build_model("llama", seed=1)
    same = FastIVLDecoder(base, value, tokenizer=tokenizer)
    ident = VocabMap.from_dense(torch.eye(len(tokenizer)))
    cross = FastIVLDecoder(base, value, ident, tokenizer=tokenizer, base_tokenizer=tokenizer)
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    a = same.generate(ids, max_new_tokens=16, eos_token_id=[])
    b = cross.generate(ids, max_new_tokens=16, eos_token_id=[])
    assert torch.equal(a.sequences, b.sequences)


def test_cross_vocab_file_round_trip_and_errors(setting, tokenizer, tmp_path, save_checkpoint):
    base_tok, vmap, base, value = setting
    bdir = tmp_path / "base"
    base.save_pretrained(bdir)
    base_tok.save_pretrained(bdir)
    vdir = save_checkpoint(value, "xv-value")
    mpath = tmp_path / "map.safetensors"
    vmap.save(mpath)
    dec = FastIVLDecoder.from_pretrained(bdir, vdir, vocab_map=mpath)
    assert dec.cross_vocab and dec.base_tokenizer.get_vocab() == base_tok.get_vocab()
    out = dec.generate(tokenizer(["The"])["input_ids"], max_new_tokens=4, eos_token_id=[])
    assert out.num_new_tokens.tolist() == [4] and int(out.sequences.max()) < len(tokenizer)
    # without a map the differing vocabularies are refused, pointing to the builder
    with pytest.raises(ValueError, match="ivl-fast vocab-map"):
        FastIVLDecoder.from_pretrained(bdir, vdir)
    # a map built for other tokenizers is refused at load
    other = VocabMap.build(tokenizer, base_tok, ["some text here"], top_k=1)
    other.save(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="built for another"):
        FastIVLDecoder.from_pretrained(bdir, vdir, vocab_map=tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="residual"):
        FastIVLDecoder(base, value, vmap, tokenizer=tokenizer, base_tokenizer=base_tok, scheme="cascade")
    with pytest.raises(ValueError, match="both tokenizers"):
        FastIVLDecoder(base, value, vmap, tokenizer=tokenizer)


def test_cli_generate_with_a_vocab_map(setting, tokenizer, tmp_path, save_checkpoint, capsys):
    import json

    from ivl_fast.cli import main as cli_main

    base_tok, vmap, base, value = setting
    bdir = tmp_path / "b"
    base.save_pretrained(bdir)
    base_tok.save_pretrained(bdir)
    vdir = save_checkpoint(value, "xv-cli-value")
    vmap.save(tmp_path / "m.safetensors")
    rc = cli_main(
        ["generate", "--base", str(bdir), "--value", str(vdir), "--vocab-map", str(tmp_path / "m.safetensors")]
        + ["--prompt", "The for statement", "--max-new-tokens", "6", "--no-eos", "--json", "--compare-base"]
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert isinstance(out["outputs"][0]["text"], str) and out["base_alone"]["tokens"] > 0


def _metaspace_tokenizer():
    """A SentencePiece-style tokenizer ("▁" for spaces; its decoder drops the leading space of a string)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    specials = ["<unk>", "<s>", "</s>", "<pad>"] + [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False)
    text = corpus_text(120_000)
    tok.train_from_iterator((text[i : i + 2000] for i in range(0, len(text), 2000)), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def test_sentencepiece_value_keeps_the_space_between_prompt_and_reply(setting):
    base_tok, _, base, _ = setting
    sp = _metaspace_tokenizer()
    vmap = VocabMap.build(base_tok, sp, [corpus_text()[200_000:240_000]], top_k=2)
    value = build_model("llama", seed=2, vocab_size=len(sp))
    dec = FastIVLDecoder(base, value, vmap, tokenizer=sp, base_tokenizer=base_tok)
    prompts = ["The for statement is", "Classes are"]
    ids = [sp(p)["input_ids"] for p in prompts]
    prompt, mask = dec._prepare_inputs(ids, None, sp.pad_token_id)
    run = dec._make_run(prompt, mask, dec._options(None, max_new_tokens=12, eos_token_id=[]), 1, prompts)
    for _ in run:
        for r, p in enumerate(prompts):
            gen = run.generated[r]
            # independent of the decoder's own helper: the value tokenizer's reading of prompt + reply
            full = sp.decode(ids[r] + gen, skip_special_tokens=True)
            reply = full[len(sp.decode(ids[r], skip_special_tokens=True)) :]
            assert run.base_context_text(r) == p + reply
            if gen and sp.convert_ids_to_tokens(gen[0]).startswith("▁"):
                assert reply.startswith(" ")
