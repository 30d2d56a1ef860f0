"""The "ivl" lm-eval model across vocabularies: generate_until hands the base the prompt text and gives the
decoder's own greedy text; loglikelihood and loglikelihood_rolling score as the decoder does (the base reading the
context's text), and a greedy continuation scores as greedy."""

from __future__ import annotations

import pytest
from conftest import build_model

from ivl_fast import FastIVLDecoder
from ivl_fast.tiny import corpus_text, train_tokenizer
from ivl_fast.vocab import VocabMap

lm_eval = pytest.importorskip("lm_eval")


def _save_pair(root, base_tok, value_tok, base, value, map_text: str):
    """base/ and value/ checkpoint dirs under ``root`` with their tokenizers, and map.safetensors between them."""
    for name, model, tok in (("base", base, base_tok), ("value", value, value_tok)):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    VocabMap.build(base_tok, value_tok, [map_text], top_k=3).save(root / "map.safetensors")
    return root


@pytest.fixture(scope="module")
def cross_dirs(tmp_path_factory, tokenizer):
    base_tok = train_tokenizer(700, max_chars=150_000)
    base = build_model("llama", seed=0, vocab_size=len(base_tok), hidden_size=96, num_attention_heads=6)
    value = build_model("llama", seed=1, vocab_size=len(tokenizer))
    return _save_pair(tmp_path_factory.mktemp("xv"), base_tok, tokenizer, base, value, corpus_text()[200_000:240_000])


def test_generate_until_across_vocabularies_equals_the_decoders_text(cross_dirs):
    from lm_eval.api.instance import Instance

    import ivl_fast.lm_eval  # noqa: F401  (registers "ivl")
    from ivl_fast.lm_eval import IVLLM

    kw = dict(
        base=str(cross_dirs / "base"), value=str(cross_dirs / "value"), vocab_map=str(cross_dirs / "map.safetensors")
    )
    lm = IVLLM(device="cpu", batch_size=2, **kw)
    prompts = ["The for statement is used", "A function definition"]
    gen = {"until": ["\n\n"], "max_gen_toks": 10, "do_sample": False}
    got = lm.generate_until([Instance("generate_until", {}, (p, gen), i) for i, p in enumerate(prompts)])
    dec = FastIVLDecoder.from_pretrained(cross_dirs / "base", cross_dirs / "value", cross_dirs / "map.safetensors")
    assert dec.cross_vocab
    tok = dec.tokenizer
    for p, text in zip(prompts, got, strict=True):
        ids = tok(p)["input_ids"]  # lm-eval's HF encoding: the tokenizer's own special tokens
        out = dec.generate([ids], texts=[p], max_new_tokens=10)
        want = tok.decode(out.sequences[0, len(ids) : len(ids) + int(out.num_new_tokens[0])], skip_special_tokens=True)
        assert text == want.split("\n\n")[0]


@pytest.fixture(scope="module")
def sentencepiece_base_dirs(tmp_path_factory, tokenizer):
    """A SentencePiece-style base (Metaspace: "▁" before the first word of a text, not after a special token)
    under the byte-level value of ``cross_dirs``' kind."""
    from ivl_fast.tiny import train_sentencepiece_style_on

    text = corpus_text(60_000)
    base_tok = train_sentencepiece_style_on([text[i : i + 4096] for i in range(0, len(text), 4096)], 400)
    base = build_model("llama", seed=2, vocab_size=len(base_tok))
    value = build_model("llama", seed=3, vocab_size=len(tokenizer))
    root = tmp_path_factory.mktemp("xv_sp")
    return _save_pair(root, base_tok, tokenizer, base, value, corpus_text()[200_000:230_000])


def test_generate_until_hands_the_base_the_chat_turn_as_rendered(sentencepiece_base_dirs, monkeypatch):
    """With --apply_chat_template the context starts with the BOS text ("<s><|user|>..."). The base reads that
    string (with its own tokenizer: no "▁" after the BOS), as loglikelihood's contexts and the demo's own evaluation
    read it, not the ids' decoding without special tokens (which a SentencePiece base reads as "▁<|user|>" after the
    BOS it adds): a tokenization its own chat pipeline would not produce."""
    from lm_eval.api.instance import Instance

    from ivl_fast.decode.cross_vocab import Retokenizer
    from ivl_fast.lm_eval import IVLLM

    root = sentencepiece_base_dirs
    lm = IVLLM(
        device="cpu",
        batch_size=2,
        base=str(root / "base"),
        value=str(root / "value"),
        vocab_map=str(root / "map.safetensors"),
    )
    contexts = [lm.apply_chat_template([{"role": "user", "content": q}]) for q in ("The for statement", "A function")]
    tok, btok = lm.dec.tokenizer, lm.dec.base_tokenizer
    assert all(c.startswith(tok.bos_token) for c in contexts)
    ids = [tok(c, add_special_tokens=False)["input_ids"] for c in contexts]
    decoded = [tok.decode(x, skip_special_tokens=True) for x in ids]
    rendered = Retokenizer(tok, btok, ids, contexts, False, 4096).base_ctx
    assert rendered != Retokenizer(tok, btok, ids, decoded, False, 4096).base_ctx, "the two readings agree here"
    assert [x[:4] for x in rendered] == [btok(c, add_special_tokens=False)["input_ids"][:4] for c in contexts]
    seen = []
    generate = lm.dec.generate

    def spy(ids, texts=None, **kw):
        seen.extend(texts)
        return generate(ids, texts=texts, **kw)

    monkeypatch.setattr(lm.dec, "generate", spy)
    gen = {"until": ["\n\n"], "max_gen_toks": 6, "do_sample": False}
    got = lm.generate_until([Instance("generate_until", {}, (c, gen), i) for i, c in enumerate(contexts)])
    assert sorted(seen) == sorted(contexts)
    for c, x, text in zip(contexts, ids, got, strict=True):
        out = generate([x], texts=[c], max_new_tokens=6)
        want = tok.decode(out.sequences[0, len(x) : len(x) + int(out.num_new_tokens[0])], skip_special_tokens=True)
        assert text == want.split("\n\n")[0]


def test_loglikelihood_across_vocabularies_through_lm_eval(cross_dirs):
    from lm_eval.api.instance import Instance

    from ivl_fast.lm_eval import IVLLM

    kw = dict(
        base=str(cross_dirs / "base"), value=str(cross_dirs / "value"), vocab_map=str(cross_dirs / "map.safetensors")
    )
    lm = IVLLM(device="cpu", batch_size=2, **kw)
    dec = FastIVLDecoder.from_pretrained(cross_dirs / "base", cross_dirs / "value", cross_dirs / "map.safetensors")
    pairs = [("The for", " statement is used"), ("A function", " definition")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)])
    want = dec.loglikelihood(pairs)
    assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in want], abs=1e-4)
    assert [g for _, g in got] == [g for _, g in want]
    # the decoder's own greedy continuation of a prompt is greedy under lm-eval's scoring too
    tok = dec.tokenizer
    prompt = "The for statement"
    out = dec.generate([tok(prompt)["input_ids"]], texts=[prompt], max_new_tokens=6, eos_token_id=[])
    cont = tok.decode(out.sequences[0, out.prompt_length :].tolist())
    ((lp, greedy),) = lm.loglikelihood([Instance("loglikelihood", {}, (prompt, cont), 0)])
    assert greedy and lp < 0
    (rolling,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("The for statement is used",), 0)])
    assert rolling == pytest.approx(dec.loglikelihood_rolling(["The for statement is used"])[0], abs=1e-4)


def test_generate_until_a_context_cut_to_fit_keeps_its_special_tokens_for_the_base(cross_dirs, monkeypatch):
    """A two-turn context longer than max_length - max_gen_toks is cut on the left, as HFLM cuts it; the base then
    reads the kept ids' prompt_text: the EOS between the turns stays the base's EOS (a decoding without special
    tokens would drop it), and the reply is the decoder's own greedy text from those ids and that text."""
    from lm_eval.api.instance import Instance

    from ivl_fast.decode.cross_vocab import prompt_text
    from ivl_fast.lm_eval import IVLLM

    kw = dict(
        base=str(cross_dirs / "base"), value=str(cross_dirs / "value"), vocab_map=str(cross_dirs / "map.safetensors")
    )
    lm = IVLLM(device="cpu", batch_size=1, max_length=30, **kw)
    tok = lm.dec.tokenizer
    context = "The for statement is used to iterate over the elements of a sequence.</s>A function definition"
    ids = tok(context)["input_ids"]
    max_gen = 8
    assert len(ids) > 30 - max_gen, "the context must be cut"
    kept = ids[-(30 - max_gen) :]
    assert tok.eos_token_id in kept and tok.eos_token_id not in ids[: len(ids) - len(kept)]
    seen = []
    generate = lm.dec.generate

    def spy(ids, texts=None, **kw):
        seen.append((ids, texts))
        return generate(ids, texts=texts, **kw)

    monkeypatch.setattr(lm.dec, "generate", spy)
    gen = {"until": ["\n\n"], "max_gen_toks": max_gen, "do_sample": False}
    (got,) = lm.generate_until([Instance("generate_until", {}, (context, gen), 0)])
    ((handed_ids, handed_texts),) = seen
    assert handed_ids == [kept]
    assert handed_texts == [prompt_text(tok, kept)] and tok.eos_token in handed_texts[0]
    out = generate([kept], texts=handed_texts, max_new_tokens=max_gen)
    want = tok.decode(out.sequences[0, len(kept) : len(kept) + int(out.num_new_tokens[0])], skip_special_tokens=True)
    assert got == want.split("\n\n")[0]
