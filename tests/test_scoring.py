"""Log-likelihood scoring against a reference built from the transformers models themselves (summed logits in
float64), for every scheme, both engines, batching with padding, left truncation, text splitting and rolling
windows."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model

from ivl_fast import FastIVLDecoder
from ivl_fast.decode.scoring import encode_pair, rolling_requests

REQS = [
    ([5, 6, 7, 8], [9, 10]),
    ([11, 12], [13, 14, 15, 16, 17]),
    ([1] + list(range(20, 40)), [41]),
    ([44], [45, 46, 47]),
    ([5, 6, 7, 8], [9, 10]),  # a duplicate: the same answer wherever it lands in a batch
]


def reference(base, value, reqs, *, alpha=1.0, max_length=10_000, scheme="residual"):
    """lm-eval's HF semantics written out: window (ctx + cont)[-(max_length + 1):][:-1], the continuation's
    positions at its end, log_softmax of the summed float64 logits; cascade from its definition."""
    out = []
    for ctx, cont in reqs:
        x = torch.tensor([(ctx + cont)[-(max_length + 1) :][:-1]])
        with torch.no_grad():
            zb = base(x).logits[0].double() if base is not None else 0.0
            if scheme.startswith("cascade"):
                emb = torch.softmax(base(x).logits[0].double(), -1) @ value.get_input_embeddings().weight.double()
                if scheme == "cascade+":
                    emb = emb + value.get_input_embeddings().weight.double()[x[0]]
                zv = value(inputs_embeds=emb[None].float()).logits[0].double()
            else:
                zv = value(x).logits[0].double() if value is not None else 0.0
        lp = (zb + alpha * zv).log_softmax(-1)[-len(cont) :]
        y = torch.tensor(cont)
        out.append((float(lp.gather(1, y[:, None]).sum()), bool((lp.argmax(-1) == y).all())))
    return out


def _close(got, want, tol=1e-4):
    assert len(got) == len(want)
    for i, ((a, ga), (b, gb)) in enumerate(zip(got, want, strict=True)):
        assert abs(a - b) <= tol * max(1.0, abs(b)), (i, a, b)
        assert ga == gb, (i, ga, gb)


@pytest.mark.parametrize("engine", ["lean", "hf"])
@pytest.mark.parametrize("batch_size", [1, 2, 8])
def test_pair_scores_equal_summed_logits_reference(pair, engine, batch_size):
    base, value, _, _ = pair
    dec = FastIVLDecoder(base, value, alpha=0.7, engine=engine)
    _close(dec.loglikelihood(REQS, batch_size=batch_size), reference(base, value, REQS, alpha=0.7))


def test_every_scheme_scores_its_own_distribution(pair):
    base, value, _, _ = pair
    _close(FastIVLDecoder(base, None, scheme="base").loglikelihood(REQS), reference(base, None, REQS))
    _close(FastIVLDecoder(None, value, scheme="value_only").loglikelihood(REQS), reference(None, value, REQS))
    for scheme in ("cascade", "cascade+"):
        got = FastIVLDecoder(base, value, scheme=scheme).loglikelihood(REQS, batch_size=3)
        _close(got, reference(base, value, REQS, scheme=scheme))


@pytest.mark.parametrize("scheme", ["value_only", "base"])
def test_one_model_alone_scores_and_decodes_as_it_is_whatever_alpha(pair, scheme):
    """Scheme base / value_only: one model as it is (combine_logits applies no alpha to a side alone). Scoring and
    decoding agree on that: the scores equal the model's own at any alpha, and the greedy tokens' logprobs that
    generate() returns sum to what loglikelihood scores for them."""
    base, value, _, _ = pair
    args = (None, value) if scheme == "value_only" else (base, None)
    dec = FastIVLDecoder(*args, scheme=scheme, alpha=0.4)
    want = reference(None, value, REQS) if scheme == "value_only" else reference(base, None, REQS)
    _close(dec.loglikelihood(REQS), want)
    out = dec.generate([[5, 6, 7]], max_new_tokens=5, eos_token_id=[], return_logprobs=True)
    cont = out.sequences[0, 3:].tolist()
    ((lp, greedy),) = dec.loglikelihood([([5, 6, 7], cont)])
    assert greedy and abs(lp - float(out.logprobs[0].sum())) < 1e-4


def test_greedy_flags_match_greedy_decoding(pair):
    """A continuation the decoder itself produced greedily is flagged greedy, and scores its logprobs' sum."""
    base, value, _, _ = pair
    dec = FastIVLDecoder(base, value)
    out = dec.generate([[5, 6, 7]], max_new_tokens=6, eos_token_id=[], return_logprobs=True)
    cont = out.sequences[0, 3:].tolist()
    (lp, greedy), (lp2, greedy2) = dec.loglikelihood(
        [([5, 6, 7], cont), ([5, 6, 7], cont[:-1] + [(cont[-1] + 1) % 512])]
    )
    assert greedy and not greedy2
    assert abs(lp - float(out.logprobs[0].sum())) < 1e-4


def test_left_truncation_to_the_window(pair):
    base, value, _, _ = pair
    dec = FastIVLDecoder(base, value)
    long = [([1] + list(range(20, 60)), [61, 62, 63])]
    _close(dec.loglikelihood(long, max_length=16), reference(base, value, long, max_length=16))
    with pytest.raises(ValueError, match="exceeds max_length=2"):
        dec.loglikelihood(long, max_length=2)


def test_text_requests_split_as_lm_eval_does(pair, tokenizer):
    """lm-eval 0.4's HF model: the tokenizer's own special tokens (this one adds BOS), the context's trailing space
    moved to the continuation, the continuation = what the whole text adds; an empty context reads BOS."""
    base, value, _, _ = pair
    dec = FastIVLDecoder(base, value, tokenizer=tokenizer)
    ctx, cont = encode_pair(tokenizer, "The for statement ", "is used")
    assert ctx == tokenizer("The for statement")["input_ids"] and ctx[0] == tokenizer.bos_token_id
    assert ctx + cont == tokenizer("The for statement is used")["input_ids"]
    assert encode_pair(tokenizer, "The for statement ", "is used", add_bos_token=False)[0] == ctx[1:]
    empty_ctx, whole = encode_pair(tokenizer, "", "is used")
    assert (
        empty_ctx == [tokenizer.bos_token_id] and whole == tokenizer("is used", add_special_tokens=False)["input_ids"]
    )
    got = dec.loglikelihood([("The for statement ", "is used"), ("", "is used")])
    _close(got, reference(base, value, [(ctx, cont), (empty_ctx, whole)]))


def test_rolling_windows_predict_every_token_once_from_at_most_max_length():
    tokens = list(range(100, 137))
    for n in (1, 4, 10, 37, 50):
        reqs = rolling_requests(tokens, prefix=7, max_length=n)
        assert [t for _, cont in reqs for t in cont] == tokens
        assert reqs[0][0] == [7]
        for ctx, cont in reqs:
            window = (ctx + cont)[-(n + 1) :][:-1]
            assert len(window) <= n and len(cont) <= n
            seen = ctx + cont
            assert seen == ([7] + tokens)[: len(seen)] or seen == tokens[tokens.index(seen[0]) :][: len(seen)]


def test_rolling_loglikelihood_is_the_sum_over_windows(pair, tokenizer):
    base, value, _, _ = pair
    dec = FastIVLDecoder(base, value, tokenizer=tokenizer)
    text = "The for statement is used to iterate over the elements of a sequence, in the order they occur."
    ids = tokenizer(text)["input_ids"]  # the tokenizer's own BOS included, as lm-eval's HF model encodes it
    full = dec.loglikelihood_rolling([text], max_length=8)[0]
    want = sum(lp for lp, _ in reference(base, value, rolling_requests(ids, tokenizer.bos_token_id, 8), max_length=8))
    assert abs(full - want) < 1e-3
    # one window holding everything: the plain log-likelihood of the text after the prefix token
    ((whole, _),) = reference(base, value, [([tokenizer.bos_token_id], ids)])
    assert abs(dec.loglikelihood_rolling([ids], max_length=len(ids))[0] - whole) < 1e-3


def test_bad_requests_are_refused(pair, tokenizer):
    base, value, _, _ = pair
    dec = FastIVLDecoder(base, value, tokenizer=tokenizer)
    for reqs, match in (
        ([([5], [])], "continuation is empty"),
        ([([], [5])], "context is empty"),
        ([([5], [600])], r"token ids in \[0, 512\)"),
        ([("a", [5])], "both be texts"),
    ):
        with pytest.raises((ValueError, TypeError), match=match):
            dec.loglikelihood(reqs)
    with pytest.raises(ValueError, match="batch_size"):
        dec.loglikelihood(REQS, batch_size=0)
    from ivl_fast.tiny import corpus_text, train_tokenizer
    from ivl_fast.vocab import VocabMap

    other = train_tokenizer(300, max_chars=60_000)
    vmap = VocabMap.build(other, tokenizer, [corpus_text()[:20_000]], top_k=2)
    cross = FastIVLDecoder(
        build_model("llama", seed=3, vocab_size=len(other)), value, vmap, tokenizer=tokenizer, base_tokenizer=other
    )
    with pytest.raises(ValueError, match="texts has 1 entries for 2 requests"):
        cross.loglikelihood([([1, 2], [3]), ([1, 2], [4])], texts=["x"])
    from ivl_fast.decode.scoring import loglikelihood, score

    with pytest.raises(ValueError, match="needs both tokenizers"):
        loglikelihood(cross.models, tokenizer, [([1, 2], [3])], 64)  # no base tokenizer
    with pytest.raises(ValueError, match="across vocabularies use loglikelihood"):
        score(cross.models, [([1, 2], [3])], max_length=64)
