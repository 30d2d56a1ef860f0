"""SlotTable, the host's record of a batch's busy slots, through its own interface: free slots lowest first, a
slot's life from add to remove, the emitted upper bound within budgets, the KV columns the next rounds need and
the rows a round runs over."""

from __future__ import annotations

import pytest

from ivl_fast.decode.slot_table import SlotTable


def test_a_slot_is_busy_from_add_to_remove_and_free_slots_come_lowest_first():
    t = SlotTable(4)
    assert t.free() == [0, 1, 2, 3] and len(t) == 0 and t.rows_in_use() == 0 and t.longest_prompt() == 0
    t.add(2, length=5, budget=3, top_logprobs=2, seeded=True)
    t.add(0, length=7, budget=1)
    assert t.free() == [1, 3] and t.free(usable=2) == [1] and t.busy() == [0, 2] and 2 in t and 1 not in t
    assert t.top_logprobs == {2: 2} and t.seeded == {2} and t.checked == {0: 0, 2: 0}
    assert t.rows_in_use() == 3 and t.longest_prompt() == 7
    t.remove(2)
    assert t.busy() == [0] and t.top_logprobs == {} and t.seeded == set() and t.rows_in_use() == 1
    t.remove(2)  # a free slot is ignored (an admission undone twice loses nothing)
    with pytest.raises(ValueError) as err:
        t.require(3)
    assert str(err.value) == "slot 3 holds no request"
    t.require(0)


def test_emitted_is_an_upper_bound_that_stops_at_each_budget():
    """Every round counts as emitting (tokens_per_round for speculative rounds) until the slot's budget; the KV
    columns a round ahead attends to follow from it without a device read."""
    t = SlotTable(3)
    t.add(0, length=4, budget=3)  # its first token is emitted at admission
    t.add(1, length=10, budget=20)
    assert t.emitted == {0: 1, 1: 1}
    assert t.kv_need() == 11 and t.kv_need(ahead=5) == 16
    t.note_rounds(1)
    assert t.emitted == {0: 2, 1: 2} and t.rounds_left() == 18
    t.note_rounds(2, tokens_per_round=4)
    assert t.emitted == {0: 3, 1: 10}  # slot 0 stops at its budget
    assert t.kv_need() == max(4 + 3, 10 + 10) and t.kv_need(ahead=100) == max(4 + 3, 10 + 20)
