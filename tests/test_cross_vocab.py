"""Decoding across vocabularies: a value network on one tokenizer steering a base with another."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model
from cross_vocab_fixtures import (
    bpe_concat_tokenizer,
    byte_fallback_concat_tokenizer,
    char_level_base_tokenizer,
    script_value,
)
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


def test_a_prompt_ending_inside_a_character_reads_the_character_its_reply_completes():
    """Prompt ids that end inside a UTF-8 character (the first byte of "é" as a byte-fallback token) decode to
    "qa\ufffd"; the reply's first token is the second byte. Given alone, the ids' text is that decoding, and once
    the reply completes the character the base reads "qaéf", the text the whole sequence decodes to, not
    "qa\ufffd..." (the prompt's decoding kept, the reply cut after its length). Given with its text ("qaé"), the
    reply is read after that text; given with a text that ends in the same replacement character ("qd\ufffd", the
    caller's own decoding), the completed character replaces it there too. Each agrees with the definition
    (tests/cross_vocab_reference.py) token for token."""
    vtok = byte_fallback_concat_tokenizer(["<unk>", "<s>", "</s>", *"qafd"])
    btok = bpe_concat_tokenizer(["<unk>", "<s>", "</s>", *"qafd", "é", "\ufffd"], [])
    v = vtok.convert_tokens_to_ids
    e1, e2 = (v(f"<0x{x:02X}>") for x in "é".encode())
    w = torch.zeros(len(btok), len(vtok))  # each base token to the value token of its first character or byte
    for i, t in enumerate(btok.convert_ids_to_tokens(list(range(len(btok))))):
        w[i, v(t) if t in vtok.get_vocab() else v(f"<0x{t.encode()[0]:02X}>")] = 1.0
    vmap = VocabMap.from_dense(w)
    base = build_model("llama", seed=6, vocab_size=len(btok))
    value = build_model("llama", seed=7, vocab_size=len(vtok))
    script_value(value, [[e1, e2, v("f"), v("d")]], strength=10.0)
    dec = FastIVLDecoder(base, value, vmap, tokenizer=vtok, base_tokenizer=btok)
    ids = [v("q"), v("a"), e1]
    assert vtok.decode(ids) == "qa\ufffd" and vtok.decode([*ids, e2]) == "qaé"
    for texts in (None, ["qaé"], ["qd\ufffd"]):  # alone; with its text; with a text ending in the same bytes
        want = "qdéf" if texts == ["qd\ufffd"] else "qaéf"
        loop = dec.start_loop([ids], texts=texts, sync_every=1, max_new_tokens=3, eos_token_id=[])
        got = [int(t) for t in loop]
        assert got == [e2, v("f"), v("d")], "the script did not hold"
        # the base read after the second token (nothing reads after the last)
        assert loop.retok.base_context_text(0) == want
        assert loop.retok.base_ctx[0] == btok(want)["input_ids"]
        ref = cross_vocab_reference(base, value, vmap, btok, vtok, [ids], 3, texts=texts)[0]
        assert ref["ids"] == [e2, v("f"), v("d")] and ref["reads"][-1] == btok(want)["input_ids"]


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
    btok = char_level_base_tokenizer()
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
    script_value(value, [[ids[0][-1], *bytes_of], [ids[1][-1], *words, vtok.eos_token_id]], strength=10.0)
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


def test_the_retokenizer_refuses_what_the_base_cannot_hold_naming_it():
    """The base's context limit, at its exact edge: a prompt of L base tokens needs a context above L + 1 (one free
    column for idle rows' writes); a row whose context reaches the limit while decoding is refused, naming it."""
    from ivl_fast.decode.cross_vocab import Retokenizer

    chars = list("abcdefqx")
    btok = bpe_concat_tokenizer(["<unk>", "<s>", "</s>", *chars], [])
    vtok = bpe_concat_tokenizer(["<unk>", "<s>", "</s>", *chars, "qq"], [("q", "q")])
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


def test_ids_alone_holding_special_tokens_read_them_in_generate_admission_and_scoring(setting, tokenizer):
    """Ids alone (no text) holding the value's EOS mid-prompt (two turns of a rendered chat): generate(), a continuous
    batch's admission and loglikelihood give the base one reading of them, the decoding with special tokens
    (prompt_text: the EOS reaches the base as its own EOS), not the decoding without them, which drops the EOS."""
    from ivl_fast.decode.cross_vocab import prompt_text

    base_tok, vmap, base, value = setting
    dec = FastIVLDecoder(base, value, vmap, tokenizer=tokenizer, base_tokenizer=base_tok, sample_backend="torch")
    ids = tokenizer(PROMPTS[0])["input_ids"] + [tokenizer.eos_token_id] + tokenizer(PROMPTS[1])["input_ids"]
    assert tokenizer.eos_token_id is not None and tokenizer.eos_token in tokenizer.decode(ids)
    assert prompt_text(tokenizer, ids) == tokenizer.decode(ids, skip_special_tokens=False)
    out = dec.generate([ids], max_new_tokens=6, eos_token_id=[], return_logprobs=True)
    want = out.sequences[0, len(ids) :].tolist()
    rendered = dec.generate([ids], texts=[tokenizer.decode(ids)], max_new_tokens=6, eos_token_id=[])
    assert rendered.sequences[0, len(ids) :].tolist() == want
    batch = dec.open_batch(slots=2, max_seq_len=64, eos_token_id=[], per_request=True)
    row = batch.admit(ids, 6)
    while not batch.is_finished(row):
        batch.step()
    assert batch.tokens(row) == want
    # scoring the greedy reply from the ids alone gives back the logprobs generate() returned
    ((lp, greedy),) = dec.loglikelihood([(ids, want)])
    assert greedy and lp == pytest.approx(float(out.logprobs[0, :6].sum()), abs=1e-4)
    # the reading without special tokens (the EOS dropped) is another context for the base
    dropped = dec.generate(
        [ids], texts=[tokenizer.decode(ids, skip_special_tokens=True)], max_new_tokens=6, eos_token_id=[]
    )
    assert dropped.sequences[0, len(ids) :].tolist() != want


def test_common_prefix_equals_the_token_by_token_scan():
    """The re-tokenizer's longest-common-prefix (list comparisons, halving where the difference lies early) against
    the plain scan, on random contexts that share a prefix of any length, with every tail setting."""
    import random

    from ivl_fast.decode.cross_vocab import common_prefix

    def scan(a, b):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n

    for a, b in (([], []), ([1], []), ([], [1]), ([1], [1]), ([1, 2], [1, 3]), ([2], [1, 2])):
        for tail in (0, 1, 5, 64):
            assert common_prefix(a, b, tail) == scan(a, b), (a, b, tail)
    rng = random.Random(0)
    for _ in range(3000):
        a = [rng.randint(0, 3) for _ in range(rng.randint(0, 200))]
        b = a[: rng.randint(0, len(a))] + [rng.randint(0, 3) for _ in range(rng.randint(0, 80))]
        for tail in (0, 1, 5, 64):
            assert common_prefix(a, b, tail) == scan(a, b) == common_prefix(b, a, tail)
