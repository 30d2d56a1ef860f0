"""Log-likelihood scoring across vocabularies: the distribution decoding samples from, teacher-forced."""

from __future__ import annotations

import pytest
from cross_vocab_reference import cross_vocab_reference

from ivl_fast import FastIVLDecoder

PROMPTS = ["The for statement is used", "A function definition", "x"]


@pytest.fixture(scope="module")
def cross(cross_setting, tokenizer):
    base_tok, vmap, base, value = cross_setting
    return FastIVLDecoder(base, value, vmap, tokenizer=tokenizer, base_tokenizer=base_tok), cross_setting


def test_scoring_a_greedy_generation_gives_back_its_logprobs(cross, tokenizer):
    """Each prompt's greedy continuation (12 tokens, across vocabularies, boundaries read) scored afterwards: the
    summed log-probability is the sum of the logprobs generate() returned, is_greedy holds, and both equal the
    float64 definition; every prefix of the continuation scores the running sum."""
    dec, (base_tok, vmap, base, value) = cross
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    out = dec.generate(ids, texts=PROMPTS, max_new_tokens=12, eos_token_id=[], return_logprobs=True)
    t = out.prompt_length
    gens = [out.sequences[r, t : t + 12].tolist() for r in range(len(PROMPTS))]
    got = dec.loglikelihood([(i, g) for i, g in zip(ids, gens, strict=True)], texts=PROMPTS, batch_size=2)
    ref = cross_vocab_reference(base, value, vmap, base_tok, tokenizer, ids, 12, texts=PROMPTS)
    for r, (lp, greedy) in enumerate(got):
        assert greedy, f"row {r}: a greedy generation scored as not greedy"
        assert lp == pytest.approx(float(out.logprobs[r].sum()), abs=2e-4)
        assert lp == pytest.approx(sum(ref[r]["lp64"]), abs=2e-3)
    steps = dec.loglikelihood([(ids[0], gens[0][:k]) for k in range(1, 13)], texts=[PROMPTS[0]] * 12)
    running = out.logprobs[0].cumsum(0).tolist()
    assert [s for s, _ in steps] == pytest.approx(running, abs=2e-4)


def test_a_batch_costs_one_pass_of_its_longest_continuation(cross, tokenizer):
    """Three requests scored in one batch equal each scored alone; the base decodes one token column per re-read
    suffix position of a step, not one forward per scored position of every request."""
    dec, _ = cross
    reqs = [("The for statement", " is used in loops"), ("A function", " definition"), ("x", " = 1")]
    alone = [dec.loglikelihood([r])[0] for r in reqs]
    calls = []
    decode = dec.base.decode

    def counted(*a, **k):
        calls.append(1)
        return decode(*a, **k)

    dec.base.decode = counted
    try:
        together = dec.loglikelihood(reqs, batch_size=3)
    finally:
        dec.base.decode = decode
    assert [lp for lp, _ in together] == pytest.approx([lp for lp, _ in alone], abs=1e-4)
    assert [g for _, g in together] == [g for _, g in alone]
    per_request = [len(tokenizer(c + x)["input_ids"]) - len(tokenizer(c)["input_ids"]) for c, x in reqs]
    assert len(calls) < sum(per_request), "scoring a batch cost a base pass per scored token of every request"


def test_rolling_log_likelihood_across_vocabularies(cross, tokenizer):
    """A whole text's rolling log-likelihood (one window) is the log-likelihood of all its ids after the prefix
    token."""
    dec, _ = cross
    text = "The for statement is used to iterate"
    ids = tokenizer(text)["input_ids"]
    (rolling,) = dec.loglikelihood_rolling([ids])
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    ((whole, _),) = dec.loglikelihood([([bos], ids)])
    assert rolling == pytest.approx(whole, abs=1e-4)
