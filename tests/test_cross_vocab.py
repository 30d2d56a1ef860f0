"""Decoding across vocabularies: a value network on one tokenizer steering a base with another."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model
from cross_vocab_reference import cross_vocab_reference

from ivl_fast import FastIVLDecoder
from ivl_fast.decode.slot_request import SlotRequest
from ivl_fast.tiny import corpus_text
from ivl_fast.vocab import VocabMap

PROMPTS = ["The for statement is used", "A function definition", "x"]


@pytest.fixture(scope="module")
def setting(cross_setting):
    return cross_setting


def test_base_context_always_decodes_to_the_text_so_far(setting, tokenizer):
    base_tok, vmap, base, value = setting
    dec = FastIVLDecoder(base, value, vmap, tokenizer=tokenizer, base_tokenizer=base_tok)
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    loop = dec.start_loop(ids, texts=PROMPTS, sync_every=1, max_new_tokens=24, eos_token_id=[])
    run = loop.retok
    rewound = 0
    for step_ids in loop:
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
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    ref = cross_vocab_reference(base, value, vmap, base_tok, tokenizer, ids, 10, texts=PROMPTS)
    assert texts == [tokenizer.decode(r["ids"], skip_special_tokens=True) for r in ref]
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
    ids = [tokenizer("The for statement")["input_ids"]]
    (ref,) = cross_vocab_reference(base, value, vmap, base_tok, tokenizer, ids, 6, texts=["The for statement"])
    assert out["outputs"] == [
        {"prompt": "The for statement", "text": tokenizer.decode(ref["ids"], skip_special_tokens=True)}
    ]
    assert out["speed"]["tokens"] == 6 and out["base_alone"]["tokens"] == 6  # --no-eos: every step counted


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
    loop = dec.start_loop(ids, texts=prompts, sync_every=1, max_new_tokens=12, eos_token_id=[])
    run = loop.retok
    for _ in loop:
        for r, p in enumerate(prompts):
            gen = run.generated[r]
            # independent of the decoder's own helper: the value tokenizer's reading of prompt + reply
            full = sp.decode(ids[r] + gen, skip_special_tokens=True)
            reply = full[len(sp.decode(ids[r], skip_special_tokens=True)) :]
            assert run.base_context_text(r) == p + reply
            if gen and sp.convert_ids_to_tokens(gen[0]).startswith("▁"):
                assert reply.startswith(" ")


def _char_level_base_tokenizer():
    """A Llama-1-like base tokenizer without byte fallback: one token per character (no merges), "▁" for spaces,
    <s> before every text and <unk> for each character outside its alphabet (not fused). So a value token of N
    characters costs the base about N tokens, and the replacement character "�" and "中" are both one <unk>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=1, special_tokens=["<unk>", "<s>", "</s>", "<pad>"], show_progress=False)
    tok.train_from_iterator([corpus_text(20_000)], trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def _script(model, chains: list[list[int]], *, strength: float = 2.0, scale: float = 20.0) -> None:
    """Give a random value model fixed successions: in each chain, token a_i is followed by a_(i+1) with a logit
    margin of about 8 * strength. Each link owns one coordinate j of the residual stream: only a_i's embedding has
    it (scale * e_j), no layer writes to it (its rows of every o_proj / down_proj are zeroed) and only
    a_(i+1)'s lm_head row reads it. Every other token keeps its random behaviour, untouched by the script."""
    links = [(a, b) for ch in chains for a, b in zip(ch[:-1], ch[1:], strict=True)]
    emb, head = model.model.embed_tokens.weight, model.lm_head.weight
    with torch.no_grad():
        coords = torch.arange(len(links))
        emb[:, coords] = 0.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[coords] = 0.0
            layer.mlp.down_proj.weight[coords] = 0.0
        for j, (a, b) in enumerate(links):
            emb[a] = 0.0
            emb[a, j] = scale
            head[b, j] = strength


@pytest.fixture(scope="module")
def ragged_setting():
    """value: SentencePiece-style with byte fallback (1000 + 256 tokens); base: character level, no byte fallback.
    Two prompts; the value model is scripted so that
      row 0 (ends "▁statement") emits the three byte tokens of "中": its text reads "�", "��", then "中", so the base
        tokenization goes [.., <unk>] -> [.., <unk>, <unk>] -> [.., <unk>]: the new one is a strict prefix of the
        old (the re-feed branch); then it runs free (both models matter);
      row 1 (ends "▁definition") emits 12 long words then EOS: ~10 base tokens per step, past the base cache the
        decoder planned (4 per step), so the cache grows while row 0 still decodes, and row 1 stops first."""
    from ivl_fast.tiny import train_sentencepiece_style_on

    text = corpus_text(120_000)
    vtok = train_sentencepiece_style_on([text[i : i + 4096] for i in range(0, len(text), 4096)], 1000)
    btok = _char_level_base_tokenizer()
    vmap = VocabMap.build(btok, vtok, [corpus_text()[200_000:220_000]], top_k=3)
    prompts = ["The for statement", "A function definition"]
    ids = [vtok(p)["input_ids"] for p in prompts]
    bytes_of = [vtok.convert_tokens_to_ids(f"<0x{x:02X}>") for x in "中".encode()]
    words = sorted((t for t in vtok.get_vocab() if t.startswith("▁") and t[1:].isalpha()), key=lambda t: (-len(t), t))
    words = [vtok.convert_tokens_to_ids(t) for t in words if vtok.convert_tokens_to_ids(t) not in ids[1]][:12]
    base = build_model("llama", seed=0, vocab_size=len(btok), hidden_size=96, num_attention_heads=6)
    value = build_model("llama", seed=1, vocab_size=len(vtok))
    # strength 10 (a margin of ~80): the scripted links must win whatever the base's pushed log-probabilities are,
    # down to the floor log(1e-30) of value tokens nothing maps to (the byte tokens: the base has none)
    _script(value, [[ids[0][-1], *bytes_of], [ids[1][-1], *words, vtok.eos_token_id]], strength=10.0)
    return btok, vtok, vmap, base, value, ids


def test_ragged_rows_refeed_and_cache_growth_match_the_definition(ragged_setting):
    """Greedy cross-vocabulary decoding equals the step-by-step recompute token for token, and each token's
    log-probability agrees with the float64 one within 2x plain torch's float32 error, on a batch where one row
    stops at EOS while the other goes on, one row's base tokenization shrinks to a prefix of the previous one (the
    base must re-read its last token) and the base's cache has to grow mid-run. A stale or corrupted base context
    shows in the log-probabilities even where it leaves the argmax alone."""
    btok, vtok, vmap, base, value, ids = ragged_setting
    n, eos = 16, vtok.eos_token_id
    ref = cross_vocab_reference(base, value, vmap, btok, vtok, ids, n, eos=(eos,))
    # the situations this test exists for really occur in the recompute
    assert len(ref[0]["ids"]) == n and eos not in ref[0]["ids"]
    assert ref[1]["ids"][-1] == eos and len(ref[1]["ids"]) < n, "row 1 must stop at EOS before row 0"
    reads = ref[0]["reads"]
    shrank = [s for s in range(1, n) if len(reads[s]) < len(reads[s - 1]) and reads[s] == reads[s - 1][: len(reads[s])]]
    assert shrank, "row 0's base tokenization never became a strict prefix of the previous one"
    grown = []
    dec = FastIVLDecoder(base, value, vmap, tokenizer=vtok, base_tokenizer=btok)
    grow = dec.base.grow

    def spy(cols):  # records the call and grows for real
        grown.append((dec.base.max_seq_len, cols))
        grow(cols)

    dec.base.grow = spy
    out = dec.generate(ids, max_new_tokens=n, eos_token_id=[eos], return_logprobs=True)
    assert grown and all(new > old for old, new in grown), "the base cache never had to grow"
    t = out.prompt_length
    assert out.num_new_tokens.tolist() == [len(r["ids"]) for r in ref]
    for i, r in enumerate(ref):
        row, k = out.sequences[i, t:].tolist(), len(r["ids"])
        assert row[:k] == r["ids"], f"row {i} diverged from the recompute at step {_first_diff(row, r['ids'])}"
        assert all(x == vtok.pad_token_id for x in row[k:])  # padded after its EOS
        lp64 = torch.tensor(r["lp64"], dtype=torch.float64)
        torch_err = float((torch.tensor(r["lp32"], dtype=torch.float64) - lp64).abs().max())
        err = (out.logprobs[i, :k].double() - lp64).abs()
        assert float(err.max()) <= max(2 * torch_err, 1e-5), (
            f"row {i}: log-prob error {err.tolist()} vs float32 torch's {torch_err:.2g}"
        )
        assert (out.logprobs[i, k:] == 0).all()
    # each row's base cache holds exactly what the recompute's base read last: row 0 the context before its final
    # token (never fed), row 1 the context it stopped in (idle since its EOS)
    assert dec.base.seq_lens[:2].tolist() == [len(ref[0]["reads"][-1]), len(ref[1]["reads"][-1])]


def test_a_batch_whose_base_cache_grew_still_notices_another_generation_taking_it(ragged_setting):
    """A continuous batch across vocabularies grows the base's cache itself (row 1 writes ~10 base tokens per step)
    and goes on; when a generate() on the same decoder then takes the caches, the batch's next step refuses."""
    btok, vtok, vmap, base, value, ids = ragged_setting
    dec = FastIVLDecoder(base, value, vmap, tokenizer=vtok, base_tokenizer=btok)
    grown, grow = [], dec.base.grow

    def spy(cols):
        grown.append(cols)
        grow(cols)

    dec.base.grow = spy
    batch = dec.open_batch(slots=2, max_seq_len=64, eos_token_id=[], per_request=True)
    slots = [batch.admit(ids[0], 12), batch.admit(ids[1], 12)]
    while not grown and not batch.is_finished(slots[1]):
        batch.step()
    assert grown, "the base cache never grew"
    batch.step()  # its own growth is not mistaken for another generation
    dec.generate([ids[0]], max_new_tokens=2, eos_token_id=[])
    with pytest.raises(RuntimeError, match="taken by another generation"):
        batch.step()


def _first_diff(a, b) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def test_penalties_across_vocabularies_with_padded_value_logits(setting, tokenizer):
    """The value model's logits padded past the map (as Qwen-style embeddings are): penalties work in the sampled
    vocabulary and change the greedy text."""
    base_tok, vmap, base, _ = setting
    value = build_model("llama", seed=1, vocab_size=len(tokenizer) + 64)
    dec = FastIVLDecoder(base, value, vmap, tokenizer=tokenizer, base_tokenizer=base_tok)
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS[:2]]
    kw = dict(max_new_tokens=12, eos_token_id=[])
    plain = dec.generate(ids, texts=PROMPTS[:2], **kw)
    pen = dec.generate(ids, texts=PROMPTS[:2], repetition_penalty=3.0, frequency_penalty=2.0, **kw)
    assert int(pen.sequences.max()) < vmap.v_value
    assert not torch.equal(plain.sequences, pen.sequences)
    # no generated id repeats within a row once it has been produced (the penalties are this strong)
    for row in pen.sequences[:, pen.prompt_length :].tolist():
        assert len(set(row)) >= len(row) - 2


def test_continuous_batching_across_vocabularies_decodes_each_request_as_alone(setting, tokenizer):
    """open_batch across vocabularies: requests join a running batch (each prefilled into its slot, the base reading
    its own tokenization), others leave, a freed slot is reused; every greedy row equals generate() alone and the
    definition (the base re-reads the text after every step); a prompt the base cannot hold is refused alone."""
    base_tok, vmap, base, value = setting
    dec = FastIVLDecoder(base, value, vmap, tokenizer=tokenizer, base_tokenizer=base_tok, sample_backend="torch")
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    budgets = [14, 5, 9]

    def alone(i):
        return dec.generate([ids[i]], texts=[PROMPTS[i]], max_new_tokens=budgets[i], eos_token_id=[])

    want = [alone(i).sequences[0, len(ids[i]) :].tolist() for i in range(3)]

    batch = dec.open_batch(slots=2, max_seq_len=64, eos_token_id=[], per_request=True)
    a = batch.admit(ids[0], budgets[0])
    batch.step()
    b = batch.admit(ids[1], budgets[1])  # joins mid-way
    got, c = {}, None
    while not batch.is_finished(a):
        batch.step()
        if c is None and batch.is_finished(b):
            got[1] = batch.tokens(b)
            batch.retire(b)
            c = batch.admit_many([SlotRequest(ids[2], budgets[2], text=PROMPTS[2])])[0]  # takes the freed slot
    got[0] = batch.tokens(a)
    while not batch.is_finished(c):
        batch.step()
    got[2] = batch.tokens(c)
    assert c == b and [got[i] for i in range(3)] == want
    ref = cross_vocab_reference(base, value, vmap, base_tok, tokenizer, [ids[0]], budgets[0], texts=[PROMPTS[0]])
    assert got[0] == ref[0]["ids"]
    batch.retire(a)
    with pytest.raises(ValueError, match="base tokens long"):
        batch.admit_many([SlotRequest(ids[2], 2, text="word " * 1000)])  # the base's reading of it: too long
    batch.retire(c)
    # of several requests, the refusal names the one the base cannot hold (the first goes unnamed) and admits none
    long = SlotRequest(ids[2], 2, text="word " * 1000)
    with pytest.raises(ValueError, match=r"^request 1: the prompt is \d+ base tokens long"):
        batch.admit_many([SlotRequest(ids[0], 2, text=PROMPTS[0]), long])
    with pytest.raises(ValueError, match=r"^the prompt is \d+ base tokens long"):
        batch.admit_many([long, SlotRequest(ids[0], 2, text=PROMPTS[0])])
    assert batch.admit(ids[2], 3) in (0, 1)  # nothing was admitted by the refused requests


def _bpe_concat(tokens: list[str], merges: list[tuple[str, str]]):
    """A BPE over whitespace-split words with a hand-written vocabulary, decoded by concatenation (no markers: a
    token's surface is itself), <s> a special token (not added)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def test_a_shrinking_context_rereads_the_boundary_it_needs():
    """The base's logits kept per row (the last 4 prefixes) must be re-read when the context shrinks below them.
    Value tokens "xabcd", "e", "f" after the prompt "qq"; the base has the characters, "de" and "cde" (merges d+e,
    c+de) and "abcdef" (no merge makes it, but it extends text). After "xabcd" the base reads 5 new tokens
    [x, a, b, c, d] (its ring holds the last 4 prefixes); after "e" the text re-tokenizes to [x, a, b, cde] (one
    token shorter), whose last 3 tokens' text "abcde" is extended by "abcdef": the rule reads the base's logits
    after [q, q, x], which the ring no longer holds, so the base must re-read from there. The same right after the
    prefill of "qqxabcd". Greedy tokens, their log-probabilities and the whole distribution at the step that
    re-reads (through scoring, in a batch whose first row finished) equal the float64 definition's."""
    chars = list("abcdefqx")
    btok = _bpe_concat(["<unk>", "<s>", "</s>", *chars, "de", "cde", "abcdef"], [("d", "e"), ("c", "de")])
    vtok = _bpe_concat(
        ["<unk>", "<s>", "</s>", *chars, "xa", "xab", "xabc", "xabcd"],
        [("x", "a"), ("xa", "b"), ("xab", "c"), ("xabc", "d")],
    )
    b, v = btok.convert_tokens_to_ids, vtok.convert_tokens_to_ids
    assert btok("xabcd")["input_ids"] == [b(c) for c in "xabcd"] and btok("xabcde")["input_ids"] == [
        b("x"), b("a"), b("b"), b("cde")
    ]
    w = torch.zeros(len(btok), len(vtok))  # each base token to the value token of its first character
    for tok, i in btok.get_vocab().items():
        w[i, v(tok if tok in vtok.get_vocab() else tok[0])] = 1.0
    vmap = VocabMap.from_dense(w)
    base = build_model("llama", seed=4, vocab_size=len(btok))
    value = build_model("llama", seed=5, vocab_size=len(vtok))
    _script(value, [[v("q"), v("xabcd"), v("e"), v("f")]], strength=10.0)
    dec = FastIVLDecoder(base, value, vmap, tokenizer=vtok, base_tokenizer=btok)
    # "qq": the shrink two steps in (after the 5 new tokens of "xabcd"); "qqxabcd": right after the prefill
    for text, at, want in (("qq", 2, ["xabcd", "e", "f"]), ("qqxabcd", 1, ["e", "f"])):
        ids = vtok(text)["input_ids"]
        ref = cross_vocab_reference(base, value, vmap, btok, vtok, [ids], 4, texts=[text])[0]
        assert ref["ids"][: len(want)] == [v(t) for t in want], "the script did not hold"
        reads = ref["reads"]
        assert len(reads[at]) == len(reads[at - 1]) - 1  # the context shrank by one token there
        out = dec.generate([ids], texts=[text], max_new_tokens=4, eos_token_id=[], return_logprobs=True)
        assert out.sequences[0, len(ids) :].tolist() == ref["ids"]
        lp64 = torch.tensor(ref["lp64"], dtype=torch.float64)
        torch_err = float((torch.tensor(ref["lp32"], dtype=torch.float64) - lp64).abs().max())
        err = float((out.logprobs[0].double() - lp64).abs().max())
        assert err <= max(2 * torch_err, 1e-5), (out.logprobs[0].tolist(), ref["lp64"])
        # the whole distribution at the step that re-reads, through scoring (the same feed): every value token next;
        # a request that finishes first sits in the batch's first row (the others are planned after it)
        firsts = ref["ids"][:at]
        reqs = [(ids + [v("q")] * 6, [v("x")])] + [(ids, firsts + [t]) for t in range(len(vtok))]
        scores = dec.loglikelihood(reqs, texts=[None] + [text] * len(vtok), batch_size=len(reqs))[1:]
        got = torch.tensor([lp for lp, _ in scores], dtype=torch.float64) - sum(ref["lp64"][:at])
        torch.testing.assert_close(got, ref["dist64"][at], atol=max(4 * torch_err, 1e-4), rtol=0)


def test_the_retokenizer_refuses_what_the_base_cannot_hold_naming_it():
    """The base's context limit, at its exact edge: a prompt of L base tokens needs a context above L + 1 (one free
    column for idle rows' writes); a row whose context reaches the limit while decoding is refused, naming it."""
    from ivl_fast.decode.cross_vocab import Retokenizer

    chars = list("abcdefqx")
    btok = _bpe_concat(["<unk>", "<s>", "</s>", *chars], [])
    vtok = _bpe_concat(["<unk>", "<s>", "</s>", *chars, "qq"], [("q", "q")])
    ids = vtok("qq")["input_ids"]  # one value token; the base reads [q, q]
    assert Retokenizer(vtok, btok, [ids], ["qq"], False, 4).base_ctx == [[btok.convert_tokens_to_ids("q")] * 2]
    with pytest.raises(ValueError) as err:
        Retokenizer(vtok, btok, [ids, ids], ["qq", "qq"], False, 3)
    assert str(err.value) == "prompt 0 is 2 base tokens long; the base's context is 3"
    with pytest.raises(ValueError) as err:
        Retokenizer(vtok, btok, [ids, []], ["qq", ""], False, 4)
    assert str(err.value) == "prompt 1 is empty for the base tokenizer"
    # a continuous batch's admission: the same edge, the message without a request prefix unless one is given
    slots = Retokenizer.slots(vtok, btok, 2, False, 3)
    with pytest.raises(ValueError) as err:
        slots.context(ids, "qq")
    assert str(err.value) == "the prompt is 2 base tokens long; the base's context is 3"
    q = btok.convert_tokens_to_ids("q")
    assert Retokenizer.slots(vtok, btok, 2, False, 4).context(ids, "qq") == ("qq", [q, q])
    # decoding: [q, q, x] fits a context of 4 (one column stays free), [q, q, x, a] does not
    rt = Retokenizer(vtok, btok, [ids], ["qq"], False, 4)
    assert rt.advance([vtok.convert_tokens_to_ids("x")], [False]) == ([2], [[btok.convert_tokens_to_ids("x")]])
    with pytest.raises(ValueError) as err:
        rt.advance([vtok.convert_tokens_to_ids("a")], [False])
    assert str(err.value) == (
        "row 0: the base context reached 4 tokens, the end of the base model's context (4); lower max_new_tokens"
    )


def test_admitting_a_prompt_longer_than_the_base_cache_planned_grows_it(ragged_setting):
    """A continuous batch plans the base's cache at 2 base tokens per value token; a prompt of long words read by a
    character-level base needs more: the admission grows the cache, the batch knows it grew it itself (its next step
    runs) and the row decodes as generate() alone."""
    btok, vtok, vmap, base, value, _ = ragged_setting
    long_words = sorted((t for t in vtok.get_vocab() if t.startswith("▁") and t[1:].isalpha()), key=len)[-8:]
    ids = [vtok.bos_token_id] + vtok.convert_tokens_to_ids(long_words)
    text = vtok.decode(ids, skip_special_tokens=True)
    dec = FastIVLDecoder(base, value, vmap, tokenizer=vtok, base_tokenizer=btok)
    batch = dec.open_batch(slots=2, max_seq_len=32, eos_token_id=[], per_request=True)
    planned = dec.base.max_seq_len
    assert planned == 2 * 32 + 16 and len(btok(text)["input_ids"]) > planned, "nothing to grow"
    slot = batch.admit_many([SlotRequest(ids, 3, text=text)])[0]
    assert dec.base.max_seq_len > planned
    while not batch.is_finished(slot):
        batch.step()
    got = batch.tokens(slot)
    del batch
    assert got == dec.generate([ids], texts=[text], max_new_tokens=3, eos_token_id=[]).sequences[0, len(ids) :].tolist()


class BaseReads:
    """What the base computes, seen at its engine's interface (prefill, rewind, decode): each row's token context and
    every prefix whose next-token logits it computed. ``needless``: prefixes computed again while the logits kept
    per row (the last MAX_BACK + 1 prefixes, one slot per length mod MAX_BACK + 1) still held them."""

    def __init__(self, base, slots: int, monkeypatch):
        self.slots, self.ctx, self.held, self.computed, self.needless = slots, {}, {}, 0, []
        prefill, rewind, decode = base.prefill, base.rewind, base.decode

        def on_prefill(ids, mask, *, rows=None, tail_logits=0, **kw):
            listed = range(ids.shape[0]) if rows is None else rows.tolist()
            for i, r in enumerate(listed):
                self.ctx[r] = [t for t, m in zip(ids[i].tolist(), mask[i].tolist(), strict=True) if m]
                self.held[r] = {}
                for k in range(min(max(tail_logits, 1), len(self.ctx[r]))):
                    self._computed(r, self.ctx[r][: len(self.ctx[r]) - k], again_ok=True)
            return prefill(ids, mask, rows=rows, tail_logits=tail_logits, **kw)

        def on_rewind(lengths):
            for r, n in enumerate(lengths.tolist()):
                if r in self.ctx:
                    self.ctx[r] = self.ctx[r][:n]
            return rewind(lengths)

        def on_decode(ids, *, active=None, **kw):
            for r, t in enumerate(ids.tolist()):
                if r in self.ctx and (active is None or bool(active[r])):
                    self.ctx[r].append(t)
                    self._computed(r, self.ctx[r])
            return decode(ids, active=active, **kw)

        for name, f in (("prefill", on_prefill), ("rewind", on_rewind), ("decode", on_decode)):
            monkeypatch.setattr(base, name, f)

    def _computed(self, r: int, prefix: list[int], again_ok: bool = False) -> None:
        self.computed += 1
        slot = len(prefix) % self.slots
        if not again_ok and self.held[r].get(slot) == tuple(prefix):
            self.needless.append((r, len(prefix)))
        self.held[r][slot] = tuple(prefix)


def test_the_base_reads_a_prefix_again_only_when_its_logits_are_no_longer_kept(setting, tokenizer, monkeypatch):
    """Across vocabularies the base keeps its logits after the last MAX_BACK + 1 prefixes of each row's context and
    re-reads (rewinds and decodes again) only where the boundary rule needs logits it no longer holds: in a batch of
    prompts decoded greedily and sampled, and in a continuous batch with a request joining, no prefix the base
    still held logits for is computed again. Its outputs stay those of generate() without the spy."""
    from ivl_fast.decode.boundary import MAX_BACK

    base_tok, vmap, base, value = setting
    dec = FastIVLDecoder(base, value, vmap, tokenizer=tokenizer, base_tokenizer=base_tok, sample_backend="torch")
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    runs = [
        {"max_new_tokens": 16},
        {"max_new_tokens": 16, "do_sample": True, "temperature": 1.3, "seed": 3},
    ]
    want = [dec.generate(ids, texts=PROMPTS, eos_token_id=[], **kw).sequences for kw in runs]
    reads = BaseReads(dec.models.base, MAX_BACK + 1, monkeypatch)
    for kw, w in zip(runs, want, strict=True):
        assert torch.equal(dec.generate(ids, texts=PROMPTS, eos_token_id=[], **kw).sequences, w)
    batch = dec.open_batch(slots=2, max_seq_len=64, eos_token_id=[], per_request=True)
    a = batch.admit(ids[0], 12)
    batch.step()
    b = batch.admit(ids[1], 8)
    while not (batch.is_finished(a) and batch.is_finished(b)):
        batch.step()
    assert reads.computed > 3 * 16
    assert reads.needless == [], reads.needless


def test_an_admission_without_text_reads_the_prompt_as_generate_does(setting, tokenizer):
    """Ids alone (no text) holding the value's EOS mid-prompt: a continuous batch's admission gives the base the same
    reading of them as generate() (the value tokenizer's decoding without special tokens), so the tokens agree."""
    base_tok, vmap, base, value = setting
    dec = FastIVLDecoder(base, value, vmap, tokenizer=tokenizer, base_tokenizer=base_tok, sample_backend="torch")
    ids = tokenizer(PROMPTS[0])["input_ids"] + [tokenizer.eos_token_id] + tokenizer(PROMPTS[1])["input_ids"]
    assert tokenizer.eos_token_id is not None and tokenizer.eos_token in tokenizer.decode(ids)
    want = dec.generate([ids], max_new_tokens=6, eos_token_id=[]).sequences[0, len(ids) :].tolist()
    batch = dec.open_batch(slots=2, max_seq_len=64, eos_token_id=[], per_request=True)
    row = batch.admit(ids, 6)
    while not batch.is_finished(row):
        batch.step()
    assert batch.tokens(row) == want
    # with the EOS read as the base's own EOS (the text with special tokens), the base's reading differs
    with_eos = dec.generate([ids], texts=[tokenizer.decode(ids)], max_new_tokens=6, eos_token_id=[])
    assert with_eos.sequences[0, len(ids) :].tolist() != want
