"""DecodeLoop through its own interface (built from a ModelSet and resolved options, no decoder around it): a batch
started together and iterated, and a continuous batch driven through the ContinuousBatch contract (admit_many,
step, read_new, tokens, retire), each equal to the decoder's generate() on the same models."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model

from ivl_fast import FastIVLDecoder
from ivl_fast.decode.continuous import ContinuousBatch
from ivl_fast.decode.inputs import pack_prompts
from ivl_fast.decode.loop import DecodeLoop
from ivl_fast.decode.slot_request import RequestError, SlotRequest
from ivl_fast.decode.speculative_slots import SpeculativeSlots

PROMPTS = [[5, 6, 7, 8], [30, 31], [40, 41, 42]]


@pytest.fixture(scope="module")
def dec():
    return FastIVLDecoder(build_model("llama", seed=21), build_model("llama", seed=22), graphs="off")


def _alone(dec, ids, n):
    return dec.generate([ids], max_new_tokens=n, eos_token_id=[]).sequences[0, len(ids) :].tolist()


def test_a_batch_started_together_yields_each_rounds_tokens(dec):
    opts = dec.options(max_new_tokens=7, eos_token_id=[])
    loop = DecodeLoop(dec.models, opts, slots=3, capacity=32, out_cols=7, sync_every=3)
    ids, mask = pack_prompts(PROMPTS, None, opts.pad_token_id, dec.vocab_size)
    loop.start(ids, mask)
    rounds = torch.stack(list(loop), 1)  # [3, 7]
    assert rounds.shape == (3, 7) and loop.steps == 7
    assert rounds.tolist() == [_alone(dec, p, 7) for p in PROMPTS]
    assert loop.num_new_tokens(3).tolist() == [7, 7, 7]


def test_a_continuous_batch_keeps_the_contract(dec):
    """Requests come and go between rounds; read_new reports each slot's new tokens once, in order, whatever the
    window; tokens() agrees; a retired slot is free again; a refused request names its field."""
    want = [_alone(dec, PROMPTS[0], 5), _alone(dec, PROMPTS[1], 9), _alone(dec, PROMPTS[2], 4)]
    opts = dec.options(max_new_tokens=6, eos_token_id=[])
    loop = DecodeLoop(
        dec.models, opts, slots=2, capacity=32, continuous=True, max_seq_len=24, out_cols=12, sync_every=1
    )
    assert isinstance(loop, ContinuousBatch) and issubclass(SpeculativeSlots, ContinuousBatch)
    assert loop.max_tokens_per_step == 1 and not loop.per_row_alpha
    slots = loop.admit_many([SlotRequest(PROMPTS[0], 5), SlotRequest(PROMPTS[1], 9)])
    assert slots == [0, 1] and loop.table.busy() == [0, 1]
    seen = {s: [] for s in slots}

    def read():  # what a server does after admitting and after every round (window: max_tokens_per_step)
        for s, new in zip(slots, loop.read_new(slots, [len(seen[s]) for s in slots], window=1), strict=True):
            seen[s] += new.ids
            assert len(new.ids) == len(new.logprobs) <= 1 and new.alternatives is None

    read()
    assert seen == {0: loop.tokens(0), 1: loop.tokens(1)}  # each first token, emitted at admission
    done = False
    while not done:
        done = loop.step()
        read()
    assert seen[0] == loop.tokens(0) == want[0]
    assert seen[1] == loop.tokens(1) == want[1]
    loop.retire(0)
    assert loop.table.free() == [0]
    with pytest.raises(ValueError, match="slot 0 holds no request"):
        loop.tokens(0)
    with pytest.raises(RequestError, match="does not fit the batch's max_seq_len") as err:
        loop.admit_many([SlotRequest(list(range(5, 25)), 10)])
    assert err.value.field == "prompt_ids"
    with pytest.raises(RequestError, match=r"max_new_tokens must be an integer in \[1, 12\]") as err:
        loop.admit_many([SlotRequest(PROMPTS[2], 30)])
    assert err.value.field == "max_new_tokens"
    (slot,) = loop.admit_many([SlotRequest(PROMPTS[2], 4)])
    assert slot == 0
    while not loop.is_finished(slot):
        loop.step()
    assert loop.tokens(slot) == want[2]  # (the models' caches are the batch's while it is open)


def test_admission_is_refused_where_a_batch_cannot_take_it(dec):
    """A batch started together takes no admissions; a continuous batch on the transformers adapter (its cache is
    dynamic, rows are no slots) takes none either; each says so in full."""
    opts = dec.options(max_new_tokens=4, eos_token_id=[])
    started = DecodeLoop(dec.models, opts, slots=2, capacity=32, out_cols=4, sync_every=1)
    with pytest.raises(ValueError) as err:
        started.admit_many([SlotRequest(PROMPTS[0], 2)])
    assert str(err.value) == "admit() needs a continuous batch (FastIVLDecoder.open_batch)"
    hf = FastIVLDecoder(build_model("llama", seed=21), build_model("llama", seed=22), engine="hf", graphs="off")
    loop = DecodeLoop(hf.models, opts, slots=2, capacity=32, continuous=True, max_seq_len=24, out_cols=4, sync_every=1)
    with pytest.raises(ValueError) as err:
        loop.admit_many([SlotRequest(PROMPTS[0], 2)])
    assert str(err.value) == "admitting requests into a running batch needs the lean engine"


def test_a_failed_admission_leaves_the_batch_owning_its_caches(dec, monkeypatch):
    """A prefill that fails mid-admission frees the slots it took; the batch still owns the models' caches, so
    another generation taking them afterwards is caught as before."""
    opts = dec.options(max_new_tokens=4, eos_token_id=[])
    loop = DecodeLoop(
        dec.models, opts, slots=2, capacity=32, continuous=True, max_seq_len=24, out_cols=8, sync_every=1
    )
    (first,) = loop.admit_many([SlotRequest(PROMPTS[0], 4)])

    def broken(*args, **kwargs):
        raise RuntimeError("injected prefill failure")

    with monkeypatch.context() as m:
        m.setattr(dec.models.value, "prefill", broken)
        with pytest.raises(RuntimeError, match="injected prefill failure"):
            loop.admit_many([SlotRequest(PROMPTS[1], 4)])
    assert loop.table.busy() == [first] and loop.table.free() == [1]
    loop.step()  # the batch goes on
    dec.generate([PROMPTS[2]], max_new_tokens=2)  # another generation takes the models' caches
    with pytest.raises(RuntimeError, match="taken by another generation"):
        loop.step()


@pytest.mark.parametrize("sync_every", [1, 3])
def test_iteration_ends_at_the_round_the_last_row_stopped(dec, sync_every):
    """A batch started together yields one [B] tensor per round up to the round its last row hit EOS; with
    sync_every > 1 a round or two may run before the host check sees it (they yield pad: no sync per round), and
    the loop's count of rounds is put back to the last row's stop."""
    free = _alone(dec, PROMPTS[0], 8)
    eos = next(t for i, t in enumerate(free) if i >= 2 and t not in free[:i])  # a token first emitted at round i
    stop = free.index(eos)
    opts = dec.options(max_new_tokens=8, eos_token_id=[eos])
    loop = DecodeLoop(dec.models, opts, slots=1, capacity=32, out_cols=8, sync_every=sync_every)
    ids, mask = pack_prompts([PROMPTS[0]], None, opts.pad_token_id, dec.vocab_size)
    loop.start(ids, mask)
    rounds = [int(r[0]) for r in loop]
    assert rounds[: stop + 1] == free[: stop + 1] and loop.steps == stop + 1
    late = rounds[stop + 1 :]  # rounds run before the check saw the stop: pad only, fewer than sync_every
    assert late == [opts.pad_token_id] * len(late) and len(late) < sync_every


def test_a_finished_row_left_in_the_batch_stays_where_it_stopped(dec):
    """A row that spent its budget but is not retired does not advance: its context stays at its last position
    while a long row runs on (a finished row advancing would walk past the cache's columns), and its tokens and
    logprobs past its end stay pad and 0."""
    long_prompt = list(range(5, 25))  # 20 tokens, budget 2: the cache holds 22 columns for it
    want_long, want_short = _alone(dec, long_prompt, 2), _alone(dec, PROMPTS[1], 12)
    opts = dec.options(max_new_tokens=12, eos_token_id=[], return_logprobs=True)
    loop = DecodeLoop(
        dec.models, opts, slots=2, capacity=24, continuous=True, max_seq_len=24, out_cols=12, sync_every=1
    )
    a, b = loop.admit_many([SlotRequest(long_prompt, 2), SlotRequest(PROMPTS[1], 12)])
    while not loop.is_finished(b):
        loop.step()
    assert loop.tokens(a) == want_long and loop.tokens(b) == want_short
    assert [e.context_lengths()[a].item() for e in dec.models.engines] == [21, 21]  # 20 + its first token fed
    (new,) = loop.read_new([a], seen=[2], window=4)
    assert new.emitted == 2 and new.ids == [] and loop.bufs.logprobs[a, 2:].abs().sum().item() == 0.0


def test_a_row_nonfinite_for_one_round_between_host_checks_is_still_reported(dec, monkeypatch):
    """Row 1's value logits are NaN in one decode round only (a fault injected at the engine's decode; the rounds
    after it are finite again): with the decoder's sync_every (8) the host check comes after finite rounds have
    followed the bad one, and it still names row 1 (and only row 1) with the rounds it covered."""
    from ivl_fast import NonFiniteLogitsError

    decode, calls = dec.models.value.decode, []

    def nan_once(*args, **kwargs):
        z = decode(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:  # the second decode round
            z = z.clone()
            z[1] = float("nan")
        return z

    monkeypatch.setattr(dec.models.value, "decode", nan_once)
    with pytest.raises(NonFiniteLogitsError) as err:
        dec.generate([PROMPTS[0], PROMPTS[2]], max_new_tokens=8, eos_token_id=[])
    assert dec.sync_every == 8
    assert err.value.rows == [1] and "within steps [0, 8)" in str(err.value)
    assert len(calls) >= 3, "no finite round followed the bad one before the check"


def test_a_stream_raises_before_yielding_a_token_drawn_from_non_finite_prefill_logits(dec, monkeypatch):
    """stream() checks the host every step: when a row's first token comes from non-finite logits (the prefill's,
    a fault injected at the value engine's prefill), iterating raises before that token is handed out."""
    from ivl_fast import NonFiniteLogitsError

    prefill = dec.models.value.prefill

    def nan_prefill(*args, **kwargs):
        z = prefill(*args, **kwargs).clone()
        z[0] = float("nan")
        return z

    monkeypatch.setattr(dec.models.value, "prefill", nan_prefill)
    steps = dec.stream([PROMPTS[0]], max_new_tokens=4, eos_token_id=[])
    with pytest.raises(NonFiniteLogitsError) as err:
        next(steps)
    assert err.value.rows == [0]


def test_graph_replays_run_no_further_ahead_than_the_host_must_look():
    """Replayed as graphs, a loop runs ahead of the host only when nothing but the device can stop it: a stream
    (sync_every=1) has its next step after each token, and with stop strings a check every sync_every rounds; only
    EOS and budgets let it replay every remaining round at once. (The tokens are the same; what differs is how soon a
    stream's tokens and a stop string's end are seen.)"""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(256)}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="t0")
    graphed = FastIVLDecoder(build_model("llama", seed=21), build_model("llama", seed=22), graphs="emulate",
                             kv_block=8, tokenizer=tok)  # fmt: skip

    def steps_after(n_yields: int, **kw) -> int:
        loop = graphed.start_loop([PROMPTS[0]], max_new_tokens=12, eos_token_id=[], **kw)
        it = iter(loop)
        for _ in range(n_yields):
            next(it)
        return loop.steps

    assert steps_after(2, sync_every=1) == 2  # a stream: one round per token
    assert steps_after(2, sync_every=3, stop_strings=["never"]) == 4  # the first chunk of 3 rounds after the prefill
    assert steps_after(2, sync_every=3) == 12  # nothing for the host to look at: every round at once
