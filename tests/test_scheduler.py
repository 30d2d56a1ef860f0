"""The server's scheduler through its own interface (submit, start, the events of each sequence, shutdown), with no
HTTP in between: which requests one prefill admits under the token budgets (at their exact edges), a cancelled
running request freeing its slot for the next, a failure after admission answered as the server's fault, each
request's own top alternatives, stop tokens, stop strings and the length limit against the same decoder's own greedy
tokens. The HTTP side of the same rules: tests/test_serve.py, tests/test_serve_features.py."""

from __future__ import annotations

import asyncio

import pytest

from ivl_fast import FastIVLDecoder
from ivl_fast.sampling import SamplingParams
from ivl_fast.serve.scheduler import Scheduler
from ivl_fast.serve.sequence import Cancelled, Delta, Failed, Finished, SequenceRequest

GREEDY = SamplingParams(False)


@pytest.fixture(scope="module")
def dirs(pair):
    return pair[2], pair[3]


@pytest.fixture(scope="module")
def alone(dirs):
    """A decoder of the same pair that no scheduler uses: the reference tokens."""
    return FastIVLDecoder.from_pretrained(*dirs)


def _greedy(dec, ids: list[int], n: int) -> list[int]:
    return dec.generate([ids], max_new_tokens=n, eos_token_id=[]).sequences[0, len(ids) :].tolist()


def _scheduler(dirs, **kw) -> Scheduler:
    kw = {"max_batch_size": 4, "max_model_len": 64, "max_queue": 16, **kw}
    return Scheduler(FastIVLDecoder.from_pretrained(*dirs), **kw)


def _spy_admissions(sched: Scheduler) -> list[tuple[int, list[int]]]:
    """(rows running, [prompt length of each request admitted]) per prefill, in order."""
    admitted = []
    admit = sched.batch.admit_many

    def spy(reqs):
        admitted.append((sched.running, [len(r.prompt_ids) for r in reqs]))
        return admit(reqs)

    sched.batch.admit_many = spy
    return admitted


async def _events(seq, timeout: float = 60) -> list:
    """Every event of one sequence, up to and with its Finished or Failed."""
    out = []
    while not out or not isinstance(out[-1], Finished | Failed):
        out.append(await asyncio.wait_for(seq.events.get(), timeout))
    return out


def _run(sched: Scheduler, requests: list[SequenceRequest], during=None) -> list[list]:
    """Queue every request before the worker starts (so the first step sees them all), then each one's events."""

    async def go():
        loop = asyncio.get_running_loop()
        seqs = [sched.submit(r, loop) for r in requests]
        sched.start()
        if during is not None:
            await during(seqs)
        return [await _events(s) for s in seqs]

    try:
        return asyncio.run(go())
    finally:
        sched.shutdown(timeout=5)


def _prompts(lengths: list[int]) -> list[list[int]]:
    """Prompts of exactly these lengths (ids well inside the tiny vocabulary, different per prompt)."""
    return [[(7 * i + j) % 50 + 10 for j in range(n)] for i, n in enumerate(lengths)]


# ---------------------------------------------------------------------------------------------- admission budgets
# lengths 5, 4, 3, 2 with 7 tokens a step: 5 alone (5 + 4 > 7), then 4 + 3 (exactly 7: at the edge, admitted
# together), then 2 (7 + 2 > 7). The first request of a step is admitted whatever its length (never split).
BUDGET_CASES = {
    "max_prefill_tokens": ({"max_prefill_tokens": 7}, [5, 4, 3, 2], [[5], [4, 3], [2]]),
    "one_over_the_budget_alone": ({"max_prefill_tokens": 7}, [9, 2, 5], [[9], [2, 5]]),
    # the step's tokens: one per running row + the prompts; 8 - 0 running = 8, then 8 - 1 = 7, then 8 - 3 = 5
    "max_num_batched_tokens": ({"max_num_batched_tokens": 8}, [5, 4, 3, 2], [[5], [4, 3], [2]]),
    "the_smaller_budget_wins": ({"max_num_batched_tokens": 8, "max_prefill_tokens": 6}, [3, 3, 3], [[3, 3], [3]]),
}


@pytest.mark.parametrize("case", list(BUDGET_CASES))
def test_each_prefill_admits_what_the_token_budget_holds_at_its_exact_edge(dirs, alone, case):
    kw, lengths, want = BUDGET_CASES[case]
    sched = _scheduler(dirs, **kw)
    admitted = _spy_admissions(sched)
    prompts = _prompts(lengths)
    ends = _run(sched, [SequenceRequest(p, 12, GREEDY) for p in prompts])
    assert [lens for _, lens in admitted] == want, admitted
    running = 0
    for (seen, _), step in zip(admitted, want, strict=True):  # nothing finished in between (12 new tokens each)
        assert seen == running, admitted
        running += len(step)
    for p, events in zip(prompts, ends, strict=True):  # each answer is its own, whatever it was admitted with
        assert sum((e.token_ids for e in events if isinstance(e, Delta)), []) == _greedy(alone, p, 12)
        assert events[-1] == Finished("length", 12)


# ---------------------------------------------------------------------------------------------- cancel, failures
def test_a_cancelled_running_request_frees_its_slot_for_the_next(dirs, alone):
    """One slot: the first request (long) is cancelled after its first tokens; it ends with a 499 and the second,
    which waited for the slot, then decodes exactly as alone."""
    sched = _scheduler(dirs, max_batch_size=1)
    admitted = _spy_admissions(sched)
    first, second = _prompts([4, 6])

    async def cancel_first(seqs):
        while not isinstance(await asyncio.wait_for(seqs[0].events.get(), 60), Delta):
            pass
        assert sched.running == 1 and not seqs[1].events.qsize()  # the second waits while the first runs
        seqs[0].cancel()

    ends = _run(sched, [SequenceRequest(first, 60, GREEDY), SequenceRequest(second, 8, GREEDY)], cancel_first)
    end = ends[0][-1]
    assert isinstance(end, Failed) and isinstance(end.error, Cancelled) and end.status == 499
    assert [lens for _, lens in admitted] == [[4], [6]]
    assert sum((e.token_ids for e in ends[1] if isinstance(e, Delta)), []) == _greedy(alone, second, 8)
    assert ends[1][-1] == Finished("length", 8)
    assert sched.running == 0


def test_a_failure_after_admission_is_the_servers_fault(dirs):
    """Reading the first tokens of admitted requests fails (even with a ValueError, which a request check would
    answer with a 400): every admitted request is answered with a 500, once, and the next request is served."""
    sched = _scheduler(dirs)
    read_new = sched.batch.read_new
    calls = []

    def broken_once(*args):
        calls.append(args[0])
        if len(calls) == 1:
            raise ValueError("injected: the device read failed")
        return read_new(*args)

    sched.batch.read_new = broken_once

    async def then_another(seqs):
        for s in seqs:
            events = await _events(s)
            assert len(events) == 1 and isinstance(events[0], Failed), events
            assert events[0].status == 500 and "injected" in str(events[0].error)
            s.events.put_nowait(events[0])  # back for _run's own read
        loop = asyncio.get_running_loop()
        later = sched.submit(SequenceRequest(_prompts([3])[0], 4, GREEDY), loop)
        assert (await _events(later))[-1] == Finished("length", 4)

    ends = _run(sched, [SequenceRequest(p, 8, GREEDY) for p in _prompts([3, 5])], then_another)
    assert all(len(e) == 1 and e[0].status == 500 for e in ends)
    assert calls[0] == [0, 1]  # both were admitted (the first read is of both slots)


# ---------------------------------------------------------------------------------------------- what each row reads
def test_each_request_gets_its_own_number_of_top_alternatives(dirs, alone):
    sched = _scheduler(dirs)
    p, q = _prompts([5, 3])
    ends = _run(sched, [SequenceRequest(p, 6, GREEDY, top_logprobs=3, logprobs=True), SequenceRequest(q, 6, GREEDY)])
    asked = [e for e in ends[0] if isinstance(e, Delta)]
    tokens = sum((e.token_ids for e in asked), [])
    assert tokens == _greedy(alone, p, 6)
    tops = sum((e.top for e in asked), [])
    logprobs = sum((e.logprobs for e in asked), [])
    assert len(tops) == 6
    for tok, lp, top in zip(tokens, logprobs, tops, strict=True):
        assert len(top) == 3 and top[0] == (tok, pytest.approx(lp, abs=1e-5))  # greedy: the most likely first
        assert [t[1] for t in top] == sorted((t[1] for t in top), reverse=True)
        assert len({t[0] for t in top}) == 3
    assert all(e.top == [] for e in ends[1] if isinstance(e, Delta))
    assert sum((e.token_ids for e in ends[1] if isinstance(e, Delta)), []) == _greedy(alone, q, 6)


def test_stop_tokens_stop_strings_and_the_length_limit(dirs, alone):
    """Against the decoder's own greedy tokens of the same prompt: a stop token ends the text before it (counted as
    a completion token), a stop string cuts the text before it (streamed text never shows a piece of it), and
    ``max_tokens`` ends with "length"."""
    (p,) = _prompts([6])
    ref = _greedy(alone, p, 10)
    tok = alone.tokenizer
    text = tok.decode(ref, skip_special_tokens=True)
    stop_at = next(i for i in range(2, 10) if ref[i] not in ref[:i])  # a token that first appears at i
    # a stop string: the text of two tokens from the 4th on, which the greedy text contains
    piece = tok.decode(ref[3:5], skip_special_tokens=True)
    assert piece.strip() and piece in text
    cut = text.find(piece)
    sched = _scheduler(dirs)
    ends = _run(
        sched,
        [
            SequenceRequest(p, 10, GREEDY, stop_token_ids=frozenset({ref[stop_at]})),
            SequenceRequest(p, 10, GREEDY, stop=(piece,)),
            SequenceRequest(p, 7, GREEDY),
        ],
    )

    def streamed(events):
        deltas = [e for e in events if isinstance(e, Delta)]
        return "".join(e.text for e in deltas), sum((e.token_ids for e in deltas), []), events[-1]

    got_text, got_ids, end = streamed(ends[0])
    assert got_ids == ref[:stop_at] and end == Finished("stop", stop_at + 1)
    assert got_text == tok.decode(ref[:stop_at], skip_special_tokens=True)
    got_text, got_ids, end = streamed(ends[1])
    assert got_text == text[:cut] and isinstance(end, Finished) and end.reason == "stop"
    assert got_ids == ref[: len(got_ids)] and len(got_ids) == end.completion_tokens
    assert tok.decode(got_ids, skip_special_tokens=True).find(piece) >= 0  # it ended on the token completing it
    got_text, got_ids, end = streamed(ends[2])
    assert got_ids == ref[:7] and end == Finished("length", 7)
    assert got_text == tok.decode(ref[:7], skip_special_tokens=True)


# ---------------------------------------------------------------------------------------------- metrics, components
def test_latency_metrics_count_each_first_token_once_and_fit_in_the_runs_time(dirs):
    """Every sequence's first token is one time-to-first-token observation and each later token one per-token gap
    (ours and vLLM's names); the observed sums fit inside the run's wall time."""
    import time

    from ivl_fast.serve.metrics import Metrics

    sched = _scheduler(dirs, metrics=Metrics("m"))
    t0 = time.perf_counter()
    _run(sched, [SequenceRequest(p, n, GREEDY) for p, n in zip(_prompts([4, 6, 3]), (5, 7, 2), strict=True)])
    wall = time.perf_counter() - t0
    reg = sched.metrics.registry

    def value(name, **labels):
        return reg.get_sample_value(name, labels)

    assert value("ivl_time_to_first_token_seconds_count") == 3
    assert value("ivl_time_per_output_token_seconds_count") == (5 - 1) + (7 - 1) + (2 - 1)
    assert value("vllm:time_to_first_token_seconds_count", model_name="m") == 3
    assert value("vllm:inter_token_latency_seconds_count", model_name="m") == 11
    assert value("vllm:generation_tokens_total", model_name="m") == 14
    assert value("vllm:prompt_tokens_total", model_name="m") == 13
    assert value("vllm:request_success_total", model_name="m", finished_reason="length") == 3
    for name in ("ivl_time_to_first_token_seconds_sum", "ivl_time_per_output_token_seconds_sum"):
        assert 0 < value(name) <= 3 * wall, name  # per sequence at most the run's time
    assert 0 < value("vllm:e2e_request_latency_seconds_sum", model_name="m") <= 3 * wall
    assert value("vllm:num_requests_running", model_name="m") == 0


def test_a_request_reads_what_the_value_network_changed_as_generate_gives_it(dirs, alone):
    """components=k: per token the base's, the value's and the combination's top-k, as generate(return_components=k)
    gives them for the request alone; a request beside it that asks for none gets none."""
    sched = _scheduler(dirs)
    p, q = _prompts([5, 3])
    ends = _run(sched, [SequenceRequest(p, 4, GREEDY, components=2), SequenceRequest(q, 4, GREEDY)])
    want = alone.generate([p], max_new_tokens=4, eos_token_id=[], return_components=2).components
    got = sum((e.components for e in ends[0] if isinstance(e, Delta)), [])
    assert len(got) == 4
    for t, comp in enumerate(got):
        for side in range(3):
            assert [i for i, _ in comp[side]] == want.ids[0, t, side].tolist()
            assert [v for _, v in comp[side]] == pytest.approx(want.values[0, t, side].tolist(), abs=1e-5)
    assert all(e.components == [] for e in ends[1] if isinstance(e, Delta))
