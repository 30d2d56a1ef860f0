"""What the base reads across vocabularies: the logits it keeps per row (the last MAX_BACK + 1 prefixes), what it
reads again when the boundary rule needs logits it no longer holds, and how its KV cache is planned and grows."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model
from cross_vocab_fixtures import BaseReads, bpe_concat_tokenizer, byte_fallback_concat_tokenizer, script_value
from cross_vocab_reference import cross_vocab_reference

from ivl_fast import FastIVLDecoder
from ivl_fast.vocab import VocabMap

PROMPTS = ["The for statement is used", "A function definition", "x"]


@pytest.fixture(scope="module")
def setting(cross_setting):
    return cross_setting


MERGES_CDE = [("d", "e"), ("c", "de")]  # "xabcde" -> [x, a, b, cde]: one token shorter than [x, a, b, c, d]
MERGES_ABCDE = MERGES_CDE + [("b", "cde"), ("a", "bcde")]  # "xabcde" -> [x, abcde]: three tokens shorter


@pytest.mark.parametrize(
    "extra, merges, shrink, reread_to",
    [
        (["de", "cde", "abcdef"], MERGES_CDE, 1, 2),
        (["de", "cde", "bcdef"], MERGES_CDE, 1, None),
        (["de", "cde", "bcde", "abcde", "abcdef"], MERGES_ABCDE, 3, 2),
    ],
    ids=["rereads", "holds", "rereads-at-the-rewind"],
)
def test_a_shrinking_context_rereads_the_boundary_it_needs(monkeypatch, extra, merges, shrink, reread_to):
    """The base's logits kept per row (the last 4 prefixes) must be re-read when the context shrinks below them.
    Value tokens "xabcd", "e", "f" after the prompt "qq"; the base has the characters, "de" and "cde" (merges d+e,
    c+de) and "abcdef" (no merge makes it, but it extends text). After "xabcd" the base reads 5 new tokens
    [x, a, b, c, d] (its ring holds the last 4 prefixes); after "e" the text re-tokenizes to [x, a, b, cde] (one
    token shorter), whose last 3 tokens' text "abcde" is extended by "abcdef": the rule reads the base's logits
    after [q, q, x], which the ring no longer holds, so the base must re-read from there. The same right after the
    prefill of "qqxabcd". Greedy tokens, their log-probabilities and the whole distribution at the step that
    re-reads (through scoring, in a batch whose first row finished) equal the float64 definition's. The base
    computes no prefix whose logits it still held (but what its KV cache must read again after one it no longer held),
    and each step reads only the new tokens, but where it re-reads from [q, q, x].
    "holds": with "bcdef" in place of "abcdef" the rule reads the logits after [q, q, x, a], which the ring still
    holds: no step reads more than the new tokens. "rereads-at-the-rewind": merges up to "abcde" make the text
    [x, abcde] (three tokens shorter): the contexts share [q, q, x], exactly the prefix whose logits the rule reads
    and the ring lost, so the base rewinds one token further than the contexts differ."""
    from ivl_fast.decode.boundary import MAX_BACK

    chars = list("abcdefqx")
    btok = bpe_concat_tokenizer(["<unk>", "<s>", "</s>", *chars, *extra], merges)
    vtok = bpe_concat_tokenizer(
        ["<unk>", "<s>", "</s>", *chars, "xa", "xab", "xabc", "xabcd"],
        [("x", "a"), ("xa", "b"), ("xab", "c"), ("xabc", "d")],
    )
    b, v = btok.convert_tokens_to_ids, vtok.convert_tokens_to_ids
    assert btok("xabcd")["input_ids"] == [b(c) for c in "xabcd"]
    assert len(btok("xabcde")["input_ids"]) == 5 - shrink
    w = torch.zeros(len(btok), len(vtok))  # each base token to the value token of its first character
    for tok, i in btok.get_vocab().items():
        w[i, v(tok if tok in vtok.get_vocab() else tok[0])] = 1.0
    vmap = VocabMap.from_dense(w)
    base = build_model("llama", seed=4, vocab_size=len(btok))
    value = build_model("llama", seed=5, vocab_size=len(vtok))
    script_value(value, [[v("q"), v("xabcd"), v("e"), v("f")]], strength=10.0)
    dec = FastIVLDecoder(base, value, vmap, tokenizer=vtok, base_tokenizer=btok)
    # "qq": the shrink two steps in (after the 5 new tokens of "xabcd"); "qqxabcd": right after the prefill
    for text, at, want in (("qq", 2, ["xabcd", "e", "f"]), ("qqxabcd", 1, ["e", "f"])):
        ids = vtok(text)["input_ids"]
        ref = cross_vocab_reference(base, value, vmap, btok, vtok, [ids], 4, texts=[text])[0]
        assert ref["ids"][: len(want)] == [v(t) for t in want], "the script did not hold"
        reads = ref["reads"]
        assert len(reads[at]) == len(reads[at - 1]) - shrink  # the context shrank there
        with monkeypatch.context() as spy:
            seen = BaseReads(dec.models.base, MAX_BACK + 1, spy)
            out = dec.generate([ids], texts=[text], max_new_tokens=4, eos_token_id=[], return_logprobs=True)
        assert out.sequences[0, len(ids) :].tolist() == ref["ids"]
        assert seen.needless == [] and seen.empty == 0, seen.needless
        # each step rewinds to what the old and the new context share and reads the rest, except where the rule
        # needs the logits after [q, q, x] (the ring no longer holds them): there it rewinds to [q, q], no further
        common = [
            next((j for j, (a, b) in enumerate(zip(p, q, strict=False)) if a != b), min(len(p), len(q)))
            for p, q in zip(reads, reads[1:], strict=False)
        ]
        to = [reread_to if i + 1 == at and reread_to is not None else c for i, c in enumerate(common)]
        want_runs = [[t, len(reads[i + 1]) - t] for i, t in enumerate(to)]
        assert seen.runs[0] == want_runs
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


def test_the_logits_after_the_first_token_stay_kept(monkeypatch):
    """A pending piece that starts at the context's second token: the prompt "qq", then "x" and "y"; the base has
    the characters and "qxyz" (no merge makes it, but it extends "qx" and "qxy"), so the rule reads the base's
    logits after [q], the shortest prefix there is, right after the prefill and one step later. The ring holds
    them from the prefill on: no step reads more than its new token, and the tokens and log-probabilities equal
    the float64 definition's."""
    from ivl_fast.decode.boundary import MAX_BACK

    chars = list("qxyz")
    btok = bpe_concat_tokenizer(["<unk>", "<s>", "</s>", *chars, "qxyz"], [])
    vtok = bpe_concat_tokenizer(["<unk>", "<s>", "</s>", *chars], [])
    v = vtok.convert_tokens_to_ids
    w = torch.zeros(len(btok), len(vtok))  # each base token to the value token of its first character
    for tok, i in btok.get_vocab().items():
        w[i, v(tok[0] if tok not in vtok.get_vocab() else tok)] = 1.0
    vmap = VocabMap.from_dense(w)
    base = build_model("llama", seed=6, vocab_size=len(btok))
    value = build_model("llama", seed=7, vocab_size=len(vtok))
    script_value(value, [[v("q"), v("x"), v("y"), v("z")]], strength=10.0)
    dec = FastIVLDecoder(base, value, vmap, tokenizer=vtok, base_tokenizer=btok)
    ids = vtok("qq")["input_ids"]
    ref = cross_vocab_reference(base, value, vmap, btok, vtok, [ids], 3, texts=["qq"])[0]
    assert ref["ids"] == [v("x"), v("y"), v("z")], "the script did not hold"
    with monkeypatch.context() as spy:
        seen = BaseReads(dec.models.base, MAX_BACK + 1, spy)
        out = dec.generate([ids], texts=["qq"], max_new_tokens=3, eos_token_id=[], return_logprobs=True)
    assert out.sequences[0, len(ids) :].tolist() == ref["ids"]
    assert seen.needless == [] and seen.empty == 0, seen.needless
    assert seen.runs[0] == [[2, 1], [3, 1]]  # the third token is the last: nothing reads after it
    lp64 = torch.tensor(ref["lp64"], dtype=torch.float64)
    torch_err = float((torch.tensor(ref["lp32"], dtype=torch.float64) - lp64).abs().max())
    assert float((out.logprobs[0].double() - lp64).abs().max()) <= max(2 * torch_err, 1e-5)


def test_a_character_completed_after_a_shrink_rereads_the_logits_the_shrink_left_behind(monkeypatch):
    """After the context shrinks below the logits kept per row, those of the prefixes it keeps are not held (their
    slots hold the longer context's), and a later step whose rule needs them must read them again. Prompt
    "qxabcd" (base: one token per character, 6 tokens; kept: the logits after the prefixes of lengths 3..6); the
    value emits the two bytes of "é" (byte-fallback tokens), then "f". After the first byte the text reads
    "qxabcd\ufffd", which the base's merges make [q, "xabcd\ufffd"]: it keeps [q] alone, whose logits it no longer
    holds (their slot holds those after [q, x, a, b, c]), and the rule reads nothing there. After the second
    byte the text reads "qxabcdé" -> [q, "xabcdé"], whose last token's text is extended by "xabcdéf" (no merge
    makes it): the rule reads the base's logits after [q], so the base must rewind to [] and read [q, "xabcdé"].
    Only a text that does not just grow makes this happen: where the text grows, a piece extended later was already
    extended when the context shrank, and the base re-read its prefix then; here "\ufffd" becomes "é". The whole
    distribution at every step (output_logits) equals the float64 definition's, and the base reads exactly: after
    the prefill, [q] + 1 token, then [] + 2 tokens (the third token is the last: nothing reads after it)."""
    from ivl_fast.decode.boundary import MAX_BACK
    from ivl_fast.vocab.align import surface_strings

    bad, e = "\ufffd", "é"
    tails = ["d", "cd", "bcd", "abcd", "xabcd"]  # the merges (d, \ufffd), (c, d\ufffd), ... and the same for "é"
    merges = [(t[0], t[1:] + c) for c in (bad, e) for t in tails]
    btok = bpe_concat_tokenizer(
        ["<unk>", "<s>", "</s>", *"qxabcdf", bad, e, *(t + c for c in (bad, e) for t in tails), "xabcdéf"], merges
    )
    vtok = byte_fallback_concat_tokenizer(["<unk>", "<s>", "</s>", *"qxabcdf"])
    b, v = btok.convert_tokens_to_ids, vtok.convert_tokens_to_ids
    e_bytes = [v(f"<0x{x:02X}>") for x in e.encode()]
    assert btok("qxabcd")["input_ids"] == [b(c) for c in "qxabcd"]
    assert vtok.decode([v("q"), e_bytes[0]]) == "q" + bad and vtok.decode([v("q"), *e_bytes]) == "q" + e
    w = torch.zeros(len(btok), len(vtok))  # each base token to the value token of its first byte
    for i, s in enumerate(surface_strings(btok)):
        if s:
            w[i, v(s[0]) if s[0] in vtok.get_vocab() else v(f"<0x{ord(s[0]):02X}>")] = 1.0
    vmap = VocabMap.from_dense(w)
    base = build_model("llama", seed=4, vocab_size=len(btok))
    value = build_model("llama", seed=5, vocab_size=len(vtok))
    script_value(value, [[v("d"), *e_bytes, v("f")]], strength=10.0)
    dec = FastIVLDecoder(base, value, vmap, tokenizer=vtok, base_tokenizer=btok)
    text = "qxabcd"
    ids = vtok(text)["input_ids"]
    ref = cross_vocab_reference(base, value, vmap, btok, vtok, [ids], 3, texts=[text])[0]
    assert ref["ids"] == [*e_bytes, v("f")], "the script did not hold"
    assert ref["reads"][1:] == [[b("q"), b("xabcd" + bad)], [b("q"), b("xabcd" + e)]]
    with monkeypatch.context() as spy:
        seen = BaseReads(dec.models.base, MAX_BACK + 1, spy)
        out = dec.generate(
            [ids], texts=[text], max_new_tokens=3, eos_token_id=[], return_dict_in_generate=True, output_logits=True
        )
    assert out.sequences[0, len(ids) :].tolist() == ref["ids"]
    tol = max(4 * max(abs(a - c) for a, c in zip(ref["lp32"], ref["lp64"], strict=True)), 1e-4)
    for step, (got, want) in enumerate(zip(out.logits, ref["dist64"], strict=True)):
        got = got[0].double().log_softmax(-1)
        torch.testing.assert_close(got, want, atol=tol, rtol=0, msg=lambda m, s=step: f"step {s}: {m}")
    assert seen.needless == [] and seen.empty == 0, seen.needless
    assert seen.runs[0] == [[1, 1], [0, 2]]


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
    assert reads.empty == 0


@pytest.fixture
def q_pair():
    """Base: one token per character; value: also "qq", "qqqq" and "qqqqqqqq". A text of n q's is n base tokens."""
    chars = list("abq")
    btok = bpe_concat_tokenizer(["<unk>", "<s>", "</s>", *chars], [])
    qs = ["qq", "qqqq", "qqqqqqqq"]
    vtok = bpe_concat_tokenizer(["<unk>", "<s>", "</s>", *chars, *qs], [("q", "q"), ("qq", "qq"), ("qqqq", "qqqq")])
    w = torch.zeros(len(btok), len(vtok))  # each base token to the value token of the same text
    for tok, i in btok.get_vocab().items():
        w[i, vtok.convert_tokens_to_ids(tok)] = 1.0
    base = build_model("llama", seed=4, vocab_size=len(btok))
    value = build_model("llama", seed=5, vocab_size=len(vtok))
    return FastIVLDecoder(base, value, VocabMap.from_dense(w), tokenizer=vtok, base_tokenizer=btok), btok, vtok


def test_generate_plans_the_base_cache_at_four_base_tokens_per_new_value_token(q_pair):
    """generate() sizes the base's KV cache at the longest base prompt + 4 base tokens per new value token + 16
    (it grows on demand past that; 3 value tokens of at most 8 characters here never need it to)."""
    dec, btok, vtok = q_pair
    texts = ["q" * 10, "ab"]
    ids = [vtok(t)["input_ids"] for t in texts]
    assert [len(btok(t)["input_ids"]) for t in texts] == [10, 2]
    dec.generate(ids, texts=texts, max_new_tokens=3, eos_token_id=[])
    assert dec.base.max_seq_len == 10 + 4 * 3 + 16


def test_the_base_cache_grows_exactly_when_an_admitted_prompt_does_not_fit(q_pair):
    """A continuous batch plans the base's cache at 2 * max_seq_len + 16 columns; a prompt of L base tokens needs
    L + 1 (a free column for idle rows' writes). At the edge (L + 1 == planned) nothing grows; one token more and the
    admission doubles the cache, and the row decodes as generate() alone."""
    from ivl_fast.decode.slot_request import SlotRequest

    dec, btok, vtok = q_pair
    for extra, grows in ((0, False), (1, True)):
        batch = dec.open_batch(slots=2, max_seq_len=24, eos_token_id=[], per_request=True)
        planned = dec.base.max_seq_len
        assert planned == 2 * 24 + 16
        text = "q" * (planned - 1 + extra)
        ids = vtok(text)["input_ids"]
        assert len(btok(text)["input_ids"]) + 1 == planned + extra and len(ids) < 24
        slot = batch.admit_many([SlotRequest(ids, 2, text=text)])[0]
        assert dec.base.max_seq_len == (2 * planned if grows else planned), extra
        while not batch.is_finished(slot):
            batch.step()
        got = batch.tokens(slot)
        del batch
    alone = dec.generate([ids], texts=[text], max_new_tokens=2, eos_token_id=[])
    assert got == alone.sequences[0, len(ids) :].tolist()


def test_the_boundary_tables_are_built_once_per_tokenizer_pair(q_pair):
    """The boundary reader's tables (~0.1 s for 131072 tokens) are built once per (base, value) tokenizer pair and
    shared by every generation over that pair."""
    from ivl_fast.decode.cross_vocab import boundary_reader

    _, btok, vtok = q_pair
    assert boundary_reader(btok, vtok) is boundary_reader(btok, vtok)
    assert boundary_reader(vtok, btok) is not boundary_reader(btok, vtok)
