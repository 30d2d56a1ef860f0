"""The engines' KV-row API, the decode core's only way into a cache: use_rows, free_rows, context_lengths,
cache_token, cache_version, step_state (ivl_fast.models.engine.SlotEngine), on the real lean engine and the real
transformers adapter (tests/test_seams.py: no module outside ivl_fast/models/ reaches into a cache)."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model

from ivl_fast.models import from_hf_model
from ivl_fast.models.engine import Engine, SlotEngine, first_rows
from ivl_fast.models.hf_adapter import HFCausalLM


@pytest.fixture(scope="module")
def lean():
    return from_hf_model(build_model("llama", seed=3))


def _prompts(b: int, t: int = 5):
    ids = torch.arange(b * t).reshape(b, t) % 100 + 3
    return ids, torch.ones(b, t, dtype=torch.long)


def test_the_engines_meet_their_protocols(lean):
    """The lean engine has every capability and every member SlotEngine lists; the transformers adapter is an
    Engine with none of the slot members (the decode core asks for capabilities, never for them blindly)."""
    assert isinstance(lean, SlotEngine) and all(getattr(lean, f"supports_{c}") for c in ("graphs", "slots"))
    hf = HFCausalLM(build_model("llama", seed=3))
    assert isinstance(hf, Engine) and not isinstance(hf, SlotEngine)
    assert not hf.supports_slots and not hf.supports_graphs


@torch.inference_mode()
def test_rows_are_freed_taken_and_given_back(lean):
    """free_rows empties exactly the rows named (every row with None); context_lengths is a copy; use_rows runs
    decode over the first rows only, and first_rows gives every row back even when its block raises."""
    lean.allocate(4, 32)
    ids, mask = _prompts(4)
    lean.prefill(ids, mask)
    assert lean.context_lengths().tolist() == [5, 5, 5, 5]
    lens = lean.context_lengths()
    lens.zero_()  # a copy: the cache keeps its positions
    assert lean.context_lengths().tolist() == [5, 5, 5, 5]
    lean.free_rows(torch.tensor([1, 3]))
    assert lean.context_lengths().tolist() == [5, 0, 5, 0]
    with first_rows([lean], 2, 4):
        lean.decode(torch.tensor([7, 8]))
        assert lean.context_lengths().tolist() == [6, 1]
    assert lean.context_lengths().tolist() == [6, 1, 5, 0]  # rows 2 and 3 untouched
    with pytest.raises(RuntimeError, match="boom"), first_rows([lean], 1, 4):
        raise RuntimeError("boom")
    assert lean.context_lengths().shape == (4,)
    lean.free_rows()
    assert lean.context_lengths().tolist() == [0, 0, 0, 0]


@torch.inference_mode()
def test_the_cache_token_changes_when_another_generation_takes_the_rows(lean):
    """cache_token: unchanged by steps, admissions into some rows and freeing; changed by allocate, by a prefill
    of every row (another generation) and by a different number of rows in use. cache_version changes only when
    the buffers are new (what a captured graph depends on); step_state is the positions a step writes."""
    lean.allocate(4, 32)
    token, version = lean.cache_token(), lean.cache_version
    ids, mask = _prompts(2)
    lean.prefill(ids, mask, rows=torch.tensor([0, 2]))
    lean.decode(torch.tensor([1, 2, 3, 4]))
    lean.free_rows(torch.tensor([2]))
    assert lean.cache_token() == token
    state = lean.step_state()
    assert len(state) == 1 and state[0].tolist() == lean.context_lengths().tolist()
    lean.prefill(*_prompts(4))
    assert lean.cache_token() != token and lean.cache_version == version  # claimed, same buffers
    token = lean.cache_token()
    lean.use_rows(2)
    assert lean.cache_token() != token
    lean.use_rows(4)
    assert lean.cache_token() == token
    lean.allocate(4, 32)
    assert lean.cache_token() != token and lean.cache_version == version  # the same store, claimed again
    lean.grow(64)
    assert lean.cache_version != version  # new buffers: graphs captured before are stale
