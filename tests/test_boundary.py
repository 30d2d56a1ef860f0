"""Reading token boundaries across vocabularies (ivl_fast.decode.boundary) on hand-made tokenizers: the case that
collapsed the demo's cross-vocabulary row ("ANSWER" then ":" where the base has one token "ANSWER:")."""

from __future__ import annotations

import math

import pytest
import torch

from ivl_fast.decode.boundary import BoundaryReader, mixed_value_logprobs


def _bpe(tokens: list[str], merges: list[tuple[str, str]]):
    """A BPE over whitespace-split words with a hand-written vocabulary (no markers: a token's surface is itself)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>")


CHARS = "A N S W E R : B C".split()
# base: "ANSWER" and "ANSWER:" are tokens (so are "AN" and "ANS" on the way); value: "ANSWER", ":" and ": B"-less
BASE = _bpe(
    ["<unk>", "<s>", *CHARS, "AN", "ANS", "ANSW", "ANSWE", "ANSWER", "ANSWER:", "B:"],
    [("A", "N"), ("AN", "S"), ("ANS", "W"), ("ANSW", "E"), ("ANSWE", "R"), ("ANSWER", ":"), ("B", ":")],
)
VALUE = _bpe(["<unk>", "<s>", *CHARS, "AN", "SW", "ER", "ANSWER"], [("A", "N"), ("S", "W"), ("E", "R")])


def _ids(tok, words: str) -> list[int]:
    return tok(words, add_special_tokens=False)["input_ids"]


def test_a_token_that_a_longer_base_token_extends_is_pending():
    reader = BoundaryReader(BASE, VALUE)
    b, v = BASE.convert_tokens_to_ids, VALUE.convert_tokens_to_ids
    # "... ANSWER": the base's last token "ANSWER" may go on as "ANSWER:", whose remainder ":" is a value token
    plan = reader.plan([b("<s>"), b("B"), b("ANSWER")])
    assert plan is not None and plan.back == 1
    assert plan.levels == ((1, (b("ANSWER:"),), (v(":"),)),)
    # two pending tokens: "AN" + "S" read as the start of "ANS..." (the base would write "ANS" as one token)
    plan = reader.plan([b("<s>"), b("AN"), b("S")])
    levels = {j: dict(zip(base, value, strict=True)) for j, base, value in plan.levels}
    assert plan.back == 2 and set(levels) == {2}
    assert levels[2] == {b("ANSW"): v("W"), b("ANSWE"): v("W"), b("ANSWER"): v("W"), b("ANSWER:"): v("W")}
    # nothing extends "B:" or ":": the plain reading (exact)
    assert reader.plan([b("<s>"), b("B:")]) is None and reader.plan([b("<s>"), b(":")]) is None
    # a special token stops a piece: "<s>" + "B" is not read as one piece
    assert reader.plan([b("<s>"), b("B")]).back == 1


def test_the_mixture_weighs_each_reading_by_the_bases_own_probability():
    """One row "<s> B ANSWER": the canonical path (ANSWER, then the base's next token pushed through W) against
    "ANSWER:" read as one token (value ":" next), each weighted by the base's probability after "<s> B"."""
    reader = BoundaryReader(BASE, VALUE)
    b, v = BASE.convert_tokens_to_ids, VALUE.convert_tokens_to_ids
    ctx = [b("<s>"), b("B"), b("ANSWER")]
    plan = reader.plan(ctx)
    vb, vv = len(BASE), len(VALUE)
    torch.manual_seed(0)
    ring = torch.randn(1, 4, vb, dtype=torch.float64)  # slots: prefix length mod 4
    after_b = ring[0, 2 % 4]  # the base's logits after "<s> B" (prefix length 2)
    pushed = torch.randn(1, vv, dtype=torch.float64).log_softmax(-1)  # the canonical path's next token, mapped
    got = mixed_value_logprobs(ring, [3], [ctx], [plan], pushed)[0]
    q = after_b.log_softmax(-1)
    a, e = math.exp(q[b("ANSWER")]), math.exp(q[b("ANSWER:")])
    want = a * pushed[0].exp()
    want[v(":")] += e
    want = (want / (a + e)).log()
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)
    assert float(got.exp().sum()) == pytest.approx(1.0, abs=1e-5)
    # no plan: the row's pushed distribution as it is
    torch.testing.assert_close(mixed_value_logprobs(ring, [3], [ctx], [None], pushed), pushed.float())
