"""GraphCache, the owner of captured steps and their persistent buffers, through its own interface (emulated
graphs: the CUDA kind is the same code with CUDA graphs): buffers kept per bucket, a miss captures once and puts
back what the warm-up wrote, a reallocated KV store drops the bucket's graphs, and why models decode eagerly."""

from __future__ import annotations

import torch
from conftest import build_model

from ivl_fast.decode.graph_cache import GraphCache, GraphSettings, capture_step
from ivl_fast.decode.model_set import ModelSet
from ivl_fast.models import from_hf_model
from ivl_fast.models.hf_adapter import HFCausalLM

CPU = torch.device("cpu")


def _cache() -> GraphCache:
    return GraphCache(GraphSettings(kind="emulate"), CPU)


def test_buffers_are_kept_per_bucket_and_remade_only_when_they_do_not_fit():
    c = _cache()
    b = c.buffers(4, rows=4, cols=8, vocab=11, backend="torch")
    assert c.buffers(4, rows=4, cols=6, vocab=11, backend="torch") is b  # enough columns: the same buffers
    assert c.buffers(("continuous", 4), rows=4, cols=8, vocab=11, backend="torch") is not b  # its own bucket
    bigger = c.buffers(4, rows=4, cols=16, vocab=11, backend="torch")
    assert bigger is not b and bigger.cols == 16
    assert c.buffers(4, rows=4, cols=16, vocab=11, backend="triton") is not bigger  # the kernel needs a workspace
    made = []
    state = c.persistent(4, "spec", lambda: made.append(1) or torch.zeros(3))
    assert c.persistent(4, "spec", lambda: made.append(1)) is state and made == [1]


def test_a_miss_captures_once_and_puts_back_what_the_warm_up_wrote():
    c = _cache()
    c.buffers(2, rows=2, cols=4, vocab=5, backend="torch")
    counter = torch.zeros(2)
    gen = torch.Generator().manual_seed(7)
    want_rng = torch.rand(3, generator=torch.Generator().manual_seed(7))
    calls = []

    def capture(pool):
        calls.append(pool(0))
        torch.rand(5, generator=gen)  # the warm-up draws: the generator is put back too

        def step(side):
            counter.add_(1)
            return counter

        return capture_step("emulate", "one_stream", ("k",), None, pool, step, None, None, None)

    g, new = c.get(2, ("k",), (1,), capture, ([counter], gen))
    assert new and calls == [None] and counter.tolist() == [0.0, 0.0]
    assert torch.equal(torch.rand(3, generator=gen), want_rng)
    again, new = c.get(2, ("k",), (1,), capture, ([counter], gen))
    assert again is g and not new and len(calls) == 1 and c.captures == 1
    g.replay_step()
    g.replay_step()
    assert counter.tolist() == [2.0, 2.0]  # the captured step, replayed on the same tensor
    assert c.captured_keys() == [("k",)]
    _, new = c.get(2, ("k",), (2,), capture, ([counter], gen))  # a KV store moved: its graphs are stale
    assert new and len(calls) == 2
    c.clear()
    assert c.captured_keys() == []


def test_why_models_decode_eagerly():
    lean = from_hf_model(build_model("llama", seed=1))
    hf = HFCausalLM(build_model("llama", seed=1))
    c = _cache()
    assert c.obstacle(ModelSet.build("residual", lean, lean)) is None
    assert c.for_models(ModelSet.build("residual", lean, lean)) is c
    assert "the lean engine" in c.obstacle(ModelSet.build("residual", hf, lean))
    assert c.for_models(ModelSet.build("residual", hf, lean)) is None
    assert GraphCache(GraphSettings(), CPU).obstacle(ModelSet.build("residual", lean, lean)) == "graphs are off"
