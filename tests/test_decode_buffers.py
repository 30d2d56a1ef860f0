"""DecodeBuffers, the one owner of the device state a step mutates, through its own interface: admission and
retirement of rows, the head view, the sampling view it builds once per step configuration, and the one-read
report of what is new in each row."""

from __future__ import annotations

import torch

from ivl_fast.decode.buffers import DecodeBuffers, NewTokens
from ivl_fast.sampling import SamplingParams

CPU = torch.device("cpu")
GREEDY = SamplingParams()
SAMPLED = SamplingParams(True, 0.7, 5, 0.9, 0.0)


def _bufs(rows=4, cols=6, vocab=11) -> DecodeBuffers:
    b = DecodeBuffers(rows, cols, vocab, CPU, "torch")
    b.reset(pad_id=0, seed=3)
    return b


def test_admit_sets_only_its_rows_and_retire_frees_them():
    b = _bufs()
    assert b.finished.all()  # every slot starts free
    rows = torch.tensor([1, 3])
    b.admit(rows, 4, SAMPLED, alpha=0.5, seed=9)
    assert b.finished.tolist() == [True, False, True, False]
    assert b.limit[rows].tolist() == [4, 4] and b.temperature[rows].tolist() == [0.699999988079071] * 2
    assert b.top_k[rows].tolist() == [5, 5] and b.alpha[rows].tolist() == [0.5, 0.5]
    assert b.seeded.tolist() == [False, True, False, True] and b.row_seed[rows].tolist() == [9, 9]
    b.admit(torch.tensor([0]), 2, GREEDY)
    assert b.temperature[0] == 0  # a greedy row reads temperature 0 in a per-row step
    b.retire(torch.tensor([3]))
    assert b.finished.tolist() == [False, False, True, True] and not b.done.item()
    b.retire(torch.tensor([0, 1]))
    assert b.done.item() == 1


def test_the_sampling_view_is_built_once_and_reads_the_buffers_in_place():
    """One view per (per_row, row_seeds): the same object on every step, whose tensors are the buffers (so an
    admission's new values reach it without a rebuild); another SamplingParams replaces it; penalty buffers
    allocated later make a fresh one that carries them; a head view's sampling reads the head's rows."""
    b = _bufs()
    per_row = b.row_sampling()
    v = b.sampling_view(per_row, per_row=True, row_seeds=True)
    assert b.sampling_view(per_row, per_row=True, row_seeds=True) is v
    assert v.params.temperature is b.temperature and v.row_step is b.steps and v.generator is b.gen
    b.admit(torch.tensor([2]), 3, SAMPLED)
    assert v.params.temperature[2] == torch.tensor(0.7)  # in place: no rebuild needed
    assert v.prompt_mask is None  # no penalty state yet
    b.ensure_penalty_buffers()
    v2 = b.sampling_view(per_row, per_row=True, row_seeds=True)
    assert v2 is not v and v2.prompt_mask is b.prompt_mask and v2.output_counts is b.output_counts
    scalar = b.sampling_view(SAMPLED, per_row=False, row_seeds=False)
    assert scalar.params is SAMPLED and scalar.row_seed is None
    other = SamplingParams(True, 1.1)
    assert b.sampling_view(other, per_row=False, row_seeds=False).params is other  # replaced, not accumulated
    greedy = b.sampling_view(GREEDY, per_row=True, row_seeds=False)
    assert greedy.params.greedy and greedy.generator is None
    head = b.head(2)
    hv = head.sampling_view(per_row, per_row=True, row_seeds=True)
    assert hv.params.temperature.shape == (2,) and hv.params.temperature.data_ptr() == b.temperature.data_ptr()


def test_read_new_reads_each_rows_new_tokens_within_the_window_in_one_read():
    b = _bufs(rows=3, cols=6)
    b.ensure_top(2)
    b.out[1, :5] = torch.tensor([7, 8, 9, 10, 4])
    b.logprobs[1, :5] = torch.tensor([-0.5, -1.0, -1.5, -2.0, -2.5])
    b.steps[1] = 5
    b.top_ids[1, :5] = torch.arange(10).reshape(5, 2)
    b.top_logprobs[1, :5] = -torch.arange(10, dtype=torch.float32).reshape(5, 2)
    b.out[2, 0] = 3
    b.steps[2] = 1
    got = b.read_new([1, 2], seen=[2, 1], window=2, top_logprobs=2)
    assert got[0] == NewTokens(5, [9, 10], [-1.5, -2.0], [[(4, -4.0), (5, -5.0)], [(6, -6.0), (7, -7.0)]])
    assert got[1] == NewTokens(1, [], [], [])  # nothing new past what was seen
    assert b.read_new([1], seen=[4], window=3)[0] == NewTokens(5, [4], [-2.5], None)
    assert b.read_new([], [], 1) == []


def test_tokens_end_at_a_finished_rows_last():
    b = _bufs(rows=2)
    b.admit(torch.tensor([0]), 5, GREEDY)
    b.out[0, :4] = torch.tensor([5, 6, 2, 0])
    b.steps[0] = 4
    assert b.tokens(0) == [5, 6, 2, 0] and not b.is_finished(0)
    b.finished[0], b.stop_step[0] = True, 2
    assert b.tokens(0) == [5, 6, 2] and b.is_finished(0)
