"""Rows are slots: a request admitted into a running batch, with others leaving before it ends, decodes exactly as
it does alone (the ground continuous batching stands on)."""

from __future__ import annotations

import pytest
from conftest import build_model

from ivl_fast import FastIVLDecoder

R = [21, 22, 23, 24, 25]  # the request under test
OTHERS = [[5, 6, 7, 8, 9, 10, 11, 12], [30, 31], [40, 41, 42, 43]]


@pytest.fixture(scope="module")
def models():
    return build_model("llama", seed=11), build_model("llama", seed=12)


def _alone(dec, ids, n):
    return dec.generate([ids], max_new_tokens=n, eos_token_id=[]).sequences[0, len(ids) :].tolist()


@pytest.mark.parametrize("graphs", ["off", "emulate"])
@pytest.mark.parametrize("scheme", ["residual", "cascade"])
def test_a_request_joining_mid_way_decodes_as_it_does_alone(models, graphs, scheme):
    base, value = models
    dec = FastIVLDecoder(base, value, scheme=scheme, graphs=graphs, kv_block=8)
    want = _alone(dec, R, 12)
    others = [_alone(dec, OTHERS[0], 4), _alone(dec, OTHERS[1], 20), _alone(dec, OTHERS[2], 3)]
    batch = dec.open_batch(slots=3, max_seq_len=40, eos_token_id=[])
    a = batch.admit(OTHERS[0], max_new_tokens=4)  # leaves before R ends
    b = batch.admit(OTHERS[1], max_new_tokens=20)  # outlives R
    for _ in range(3):
        batch.step()
    r = batch.admit(R, max_new_tokens=12)  # joins a running batch
    steps = 0
    while not batch.is_finished(r):
        batch.step()
        steps += 1
        if a is not None and batch.is_finished(a):
            assert batch.tokens(a) == others[0]
            batch.retire(a)
            a = None
            c = batch.admit(OTHERS[2], max_new_tokens=3)  # a third request takes the freed slot mid-way
    assert steps == 11 and batch.tokens(r) == want
    assert batch.tokens(c) == others[2]
    while not batch.is_finished(b):
        batch.step()
    assert batch.tokens(b) == others[1]  # the long row was untouched by the others
    if graphs == "emulate":
        assert dec.graph_captures > 0
    dec.generate([R], max_new_tokens=2)  # another generation takes the models' caches: the batch says so
    with pytest.raises(RuntimeError, match="taken by another generation"):
        batch.step()


def test_slot_errors(models):
    base, value = models
    dec = FastIVLDecoder(base, value)
    batch = dec.open_batch(slots=1, max_seq_len=16)
    with pytest.raises(ValueError, match="admit one first"):
        batch.step()
    s = batch.admit([5, 6], max_new_tokens=3)
    with pytest.raises(ValueError, match="slots are taken"):
        batch.admit([7])
    batch.retire(s)
    with pytest.raises(ValueError, match="holds no request"):
        batch.retire(s)
    with pytest.raises(ValueError, match="does not fit"):
        batch.admit(list(range(5, 15)), max_new_tokens=10)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer"):
        batch.admit([5], max_new_tokens=0)
    with pytest.raises(ValueError, match="slots must be"):
        dec.open_batch(slots=0, max_seq_len=16)


@pytest.mark.parametrize("graphs", ["off", "emulate"])
def test_another_generation_of_the_same_shape_is_caught(models, graphs):
    """generate() on the same decoder takes the models' caches even at the batch's own shape (one row, same
    capacity): the open batch refuses to step or admit instead of decoding from someone else's rows."""
    base, value = models
    dec = FastIVLDecoder(base, value, graphs=graphs, kv_block=8)
    batch = dec.open_batch(slots=1, max_seq_len=40, eos_token_id=[])
    batch.admit(R, max_new_tokens=10)
    batch.step()
    dec.generate([R], max_new_tokens=30, eos_token_id=[])
    with pytest.raises(RuntimeError, match="taken by another generation"):
        batch.step()
    with pytest.raises(RuntimeError, match="taken by another generation"):
        batch.admit(R)


def test_a_bad_prompt_is_refused_and_leaves_the_slot_free(models):
    base, value = models
    dec = FastIVLDecoder(base, value)
    want = _alone(dec, R, 5)
    batch = dec.open_batch(slots=1, max_seq_len=40, eos_token_id=[])
    for bad, match in (([5, 600], "outside"), ([5, -1], "outside"), ([5, 2.5], "integer token ids")):
        with pytest.raises(ValueError, match=match):
            batch.admit(bad, max_new_tokens=5)
    s = batch.admit(R, max_new_tokens=5)  # the one slot is still free and clean
    while not batch.step():
        pass
    assert batch.tokens(s) == want


def test_a_non_finite_request_is_retired_and_the_others_carry_on(models):
    """A request whose logits go NaN raises at the host check naming its slot; once retired, the batch goes on
    and the other request's tokens are those it gets alone."""
    import copy

    import torch

    from ivl_fast import NonFiniteLogitsError

    base, value = models
    poisoned = copy.deepcopy(value)
    with torch.no_grad():
        poisoned.model.embed_tokens.weight[99] = float("nan")  # any context holding token 99 gives NaN logits
    dec = FastIVLDecoder(base, poisoned)
    want = _alone(dec, R, 8)
    batch = dec.open_batch(slots=2, max_seq_len=40, eos_token_id=[])
    good = batch.admit(R, max_new_tokens=8)
    batch.step()
    bad = batch.admit([5, 99, 6], max_new_tokens=8)
    with pytest.raises(NonFiniteLogitsError, match=rf"row\(s\) \[{bad}\]"):
        batch.step()
    batch.retire(bad)
    while not batch.is_finished(good):
        batch.step()
    assert batch.tokens(good) == want


def test_captured_ahead_continuous_batches_capture_nothing_later(models):
    base, value = models
    dec = FastIVLDecoder(base, value, graphs="emulate", kv_block=8)
    n = dec.capture_graphs(batch_sizes=(2,), max_seq_len=24, continuous=True, eos_token_id=[])
    assert n > 0
    before = dec.graph_captures
    batch = dec.open_batch(slots=2, max_seq_len=24, eos_token_id=[])
    a = batch.admit(R, max_new_tokens=19)
    b = batch.admit(OTHERS[1], max_new_tokens=6)
    while not (batch.is_finished(a) and batch.is_finished(b)):
        batch.step()
    assert dec.graph_captures == before  # every round replayed a graph captured at start-up


@pytest.mark.parametrize("graphs", ["off", "emulate"])
def test_per_request_sampling_values_each_decode_as_alone(models, graphs):
    """A batch opened with per_request=True: every request brings its own values (greedy, a penalty, sampling
    restricted to one token, a plain greedy default) and each decodes as generate() with those options alone."""
    from ivl_fast.sampling import SamplingParams

    base, value = models
    dec = FastIVLDecoder(base, value, graphs=graphs, kv_block=8)
    cases = [
        (R, dict()),
        (OTHERS[0], dict(repetition_penalty=1.5, presence_penalty=0.4)),
        (OTHERS[1], dict(do_sample=True, temperature=0.7, top_k=1, seed=0)),
        (OTHERS[2], dict(frequency_penalty=0.8)),
    ]
    batch = dec.open_batch(slots=4, max_seq_len=40, eos_token_id=[], per_request=True)
    slots = []
    for ids, opts in cases:
        sampling = None if not opts else dec.options(**opts).sampling
        slots.append(batch.admit(ids, max_new_tokens=10, sampling=sampling))
        batch.step()
    while not all(batch.is_finished(s) for s in slots):
        batch.step()
    for (ids, opts), s in zip(cases, slots, strict=True):
        want = dec.generate([ids], max_new_tokens=10, eos_token_id=[], **opts).sequences[0, len(ids) :].tolist()
        assert batch.tokens(s) == want, opts
    plain = dec.open_batch(slots=2, max_seq_len=40, eos_token_id=[])
    with pytest.raises(ValueError, match="per_request=True"):
        plain.admit(R, 4, sampling=SamplingParams(False))


def test_per_request_alpha_each_row_decodes_with_its_own_weight(models):
    """alpha per request in one batch (the torch sampler): 0 = the base alone, 1 = full IVL, 0.5 between; each row
    equals a decoder with that alpha alone. The fused kernel takes one alpha: refused there, naming it."""
    base, value = models
    dec = FastIVLDecoder(base, value, sample_backend="torch")
    batch = dec.open_batch(slots=3, max_seq_len=40, eos_token_id=[], per_request=True)
    cases = list(zip((0.0, 1.0, 0.5), (R, OTHERS[0], OTHERS[1]), strict=True))
    slots = {a: batch.admit(ids, 10, alpha=a) for a, ids in cases}
    while not all(batch.is_finished(s) for s in slots.values()):
        batch.step()
    for a, ids in cases:
        alone = FastIVLDecoder(base, value, alpha=a, sample_backend="torch")
        assert batch.tokens(slots[a]) == _alone(alone, ids, 10), a
    with pytest.raises(ValueError, match="alpha must be a finite number"):
        dec.open_batch(slots=1, max_seq_len=40, per_request=True).admit(R, 4, alpha=float("nan"))
    fused = FastIVLDecoder(base, value, sample_backend="triton")
    with pytest.raises(ValueError, match="per-request alpha needs the torch sampler"):
        fused.open_batch(slots=1, max_seq_len=40, per_request=True).admit(R, 4, alpha=0.5)


def test_admit_many_prefills_together_and_each_decodes_as_alone(models):
    """Several requests of different lengths, budgets and values admitted with one prefill into a running batch."""
    base, value = models
    dec = FastIVLDecoder(base, value, sample_backend="torch")
    alone = FastIVLDecoder(base, value, alpha=0.0, sample_backend="torch")
    pen = dec.generate([OTHERS[1]], max_new_tokens=12, eos_token_id=[], repetition_penalty=1.4).sequences
    want = [
        _alone(dec, OTHERS[0], 9),
        _alone(dec, R, 7),
        pen[0, len(OTHERS[1]) :].tolist(),
        _alone(alone, OTHERS[2], 5),
    ]
    batch = dec.open_batch(slots=4, max_seq_len=40, eos_token_id=[], per_request=True)
    first = batch.admit(OTHERS[0], 9)
    batch.step()
    reqs = [(R, 7, None, None), (OTHERS[1], 12, dec.options(repetition_penalty=1.4).sampling, None)]
    reqs.append((OTHERS[2], 5, None, 0.0))
    slots = [first, *batch.admit_many(reqs)]
    assert len(set(slots)) == 4
    while not all(batch.is_finished(s) for s in slots):
        batch.step()
    assert [batch.tokens(s) for s in slots] == want
    batch.retire(slots[0])
    batch.retire(slots[1])
    with pytest.raises(ValueError, match="request 1: max_new_tokens"):
        batch.admit_many([(R, 3, None, None), (R, 0, None, None)])


def test_an_eager_step_skips_the_free_slots_above_the_busy_ones(models):
    """One request in an 8-slot batch: the models decode 1 row per step, not 8 (and the tokens are its own); a
    request in slot 2 makes them decode 3."""
    base, value = models
    dec = FastIVLDecoder(base, value)
    want = _alone(dec, R, 6)
    seen = []
    real = dec.base.decode

    def spy(ids, **kw):
        seen.append(ids.shape[0])
        return real(ids, **kw)

    dec.base.decode = spy
    batch = dec.open_batch(slots=8, max_seq_len=40, eos_token_id=[])
    s = batch.admit(R, 6)
    while not batch.is_finished(s):
        batch.step()
    assert batch.tokens(s) == want and set(seen) == {1}
    a, b = batch.admit(OTHERS[0], 4), batch.admit(OTHERS[1], 4)
    batch.retire(s)
    batch.retire(a)
    seen.clear()
    batch.step()
    assert (a, b) == (1, 2) and seen == [3]


def _run(batch, slots):
    while not all(batch.is_finished(s) for s in slots):
        batch.step()
    return [batch.tokens(s) for s in slots]


@pytest.mark.parametrize("graphs", ["off", "emulate"])
def test_a_seeded_request_draws_the_same_tokens_in_any_batch_and_slot(models, graphs):
    """A sampled request with its own seed: the same tokens alone, in a later slot of a batch busy with other
    sampled requests (seeded and not), and on the other sampler (the fused kernel draws the same Philox numbers);
    another seed draws other tokens."""
    base, value = models
    sp = FastIVLDecoder(base, value).options(do_sample=True, temperature=1.3, top_p=0.95).sampling
    want = None
    for backend in ("torch", "triton"):
        dec = FastIVLDecoder(base, value, graphs=graphs, kv_block=8, sample_backend=backend)
        alone = dec.open_batch(slots=1, max_seq_len=40, eos_token_id=[], per_request=True)
        (got,) = _run(alone, [alone.admit(R, 16, sampling=sp, seed=2024)])
        want = got if want is None else want
        assert got == want, backend  # both samplers: the same tokens for the same seed
        batch = dec.open_batch(slots=4, max_seq_len=40, eos_token_id=[], per_request=True)
        busy = [batch.admit(OTHERS[0], 12, sampling=sp), batch.admit(OTHERS[1], 6, sampling=sp, seed=7)]
        batch.step()
        batch.step()
        mine = batch.admit(R, 16, sampling=sp, seed=2024)  # slot 2, joining a running batch
        other_seed = batch.admit(R, 16, sampling=sp, seed=2025)
        got, different = _run(batch, [mine, other_seed])
        _run(batch, busy)
        assert mine == 2 and got == want, backend
        assert different != want
    assert len(set(want)) > 3  # it sampled (not one token over and over)


def test_top_logprobs_are_the_most_likely_tokens_of_the_combined_distribution(models):
    """open_batch(top_logprobs=3): a request that asks records, per new token, the 3 most likely tokens of
    log_softmax(z_base + z_value) and their log-probabilities (recomputed here with the transformers models); the
    sampled token's own logprob is among them under greedy decoding; a request that does not ask costs nothing."""
    import torch

    base, value = models
    dec = FastIVLDecoder(base, value)
    batch = dec.open_batch(
        slots=2, max_seq_len=40, eos_token_id=[], per_request=True, top_logprobs=3, return_logprobs=True
    )
    asks = batch.admit(R, 8, top_logprobs=3)
    quiet = batch.admit(OTHERS[0], 8)
    toks, _ = _run(batch, [asks, quiet])
    b = batch.bufs
    ids = torch.tensor([R + toks])
    with torch.no_grad():
        z = (base(ids).logits + value(ids).logits)[0, len(R) - 1 : -1].log_softmax(-1)  # [8, V]
    want_lp, want_ids = z.topk(3, dim=-1)
    assert b.top_ids[asks, :8].tolist() == want_ids.tolist()
    torch.testing.assert_close(b.top_logprobs[asks, :8], want_lp, atol=1e-4, rtol=0)
    assert b.top_ids[asks, :8, 0].tolist() == toks  # greedy: the top-1 is the token emitted
    torch.testing.assert_close(b.logprobs[asks, :8], want_lp[:, 0], atol=1e-4, rtol=0)
    batch.retire(asks)
    with pytest.raises(ValueError, match=r"top_logprobs must be an integer in \[0, 3\]"):
        batch.admit(R, 4, top_logprobs=4)
    with pytest.raises(ValueError, match="seed must be an integer"):
        batch.admit(R, 4, seed=1.5)
    with pytest.raises(ValueError, match="per_request=True"):
        dec.open_batch(slots=1, max_seq_len=40).admit(R, 4, seed=3)
