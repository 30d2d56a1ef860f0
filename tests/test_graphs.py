"""Graph-captured decode on CPU: the graph emulator's semantics, the buckets, the Python replay runner, and the
decoder's graph path (emulated graphs, all layouts and schemes) against eager decoding.

The CUDA path itself (torch.cuda.CUDAGraph, two streams, the C++ runner) needs a GPU: `test_cuda_graphs_*` run
only where one is present.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import build_model

from ivl_fast import FastIVLDecoder, NonFiniteLogitsError
from ivl_fast.graphs import (
    EmulatedGraph,
    GraphCaptureError,
    StepGraphs,
    batch_bucket,
    kv_bucket,
    kv_segments,
    run_python,
)

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [1, 20, 30, 40, 50, 60, 70, 80, 90]]  # 3 rows: bucket 4, one pad row
KW = dict(max_new_tokens=28, eos_token_id=[], return_logprobs=True)


# ---------------------------------------------------------------------------------------------- the emulator
def test_emulated_graph_replays_ops_on_static_tensors_with_python_values_frozen():
    x = torch.tensor([1.0, 2.0, 3.0])
    out = torch.zeros(3)
    scale = {"v": 2.0}
    g = EmulatedGraph()

    def step():
        y = x * scale["v"] + 1  # an intermediate: recreated on replay
        out.copy_(y)
        return y

    y = g.capture(step)
    assert out.tolist() == [3.0, 5.0, 7.0]
    x.copy_(torch.tensor([10.0, 20.0, 30.0]))  # static input changed in place: replay sees it
    scale["v"] = 100.0  # a Python value changed after capture: replay does not (as in a CUDA graph)
    g.replay()
    assert out.tolist() == [21.0, 41.0, 61.0]
    assert y.tolist() == [21.0, 41.0, 61.0]  # the captured call's output is overwritten in place
    x2 = torch.tensor([0.0, 0.0, 0.0])
    x = x2  # rebinding the Python name: the graph still reads the captured tensor
    g.replay()
    assert out.tolist() == [21.0, 41.0, 61.0]
    assert g.num_ops >= 3


@pytest.mark.parametrize("bad", ["item", "nonzero", "bool", "mask_index", "mask_assign"])
def test_emulated_capture_refuses_host_syncs(bad):
    x = torch.tensor([1.0, -2.0])

    def step():
        if bad == "item":
            return x.sum().item()
        if bad == "nonzero":
            return x.nonzero()
        if bad == "mask_index":
            return x[x > 0]
        if bad == "mask_assign":
            y = x.clone()
            y[y > 0] = 0.0
            return y
        return bool(x[0] > 0)

    with pytest.raises(GraphCaptureError, match="captured decode step"):
        EmulatedGraph().capture(step)


def test_emulated_graph_rng_and_in_place_counters_advance_per_replay():
    gen = torch.Generator().manual_seed(0)
    counter = torch.zeros(1, dtype=torch.int64)
    draws = torch.zeros(4)
    g = EmulatedGraph()

    def step():
        draws.copy_(torch.empty(4).exponential_(1.0, generator=gen))
        counter.add_(1)

    g.capture(step)
    first = draws.clone()
    g.replay()
    assert counter.item() == 2 and not torch.equal(first, draws)
    gen.manual_seed(0)
    g.replay()
    assert torch.equal(first, draws)  # the same generator object is replayed


# ---------------------------------------------------------------------------------------------- buckets
def test_batch_and_kv_buckets():
    assert [batch_bucket(b) for b in (1, 2, 3, 4, 5, 8, 9, 33)] == [1, 2, 4, 4, 8, 8, 16, 64]
    with pytest.raises(ValueError):
        batch_bucket(0)
    assert kv_bucket(1, 4096) == 256 and kv_bucket(257, 4096) == 512 and kv_bucket(1025, 4096) == 2048
    assert kv_bucket(3000, 3000) == 3000 and kv_bucket(60, 64, 16) == 64 and kv_bucket(17, 1000, 16) == 32
    with pytest.raises(ValueError, match="cache holds"):
        kv_bucket(5000, 4096)


@pytest.mark.parametrize("t,first,last,cap,block", [(9, 1, 40, 64, 8), (128, 1, 511, 1024, 256), (5, 3, 3, 16, 4)])
def test_kv_segments_cover_every_step_once_with_enough_columns(t, first, last, cap, block):
    """Rounds first..last of a batch started together (round j attends to t + j columns), as DecodeLoop replays
    them: every round in one run, each run's bucket holding its rounds' columns, buckets growing."""
    segs = kv_segments([t + j for j in range(first, last + 1)], cap, block)
    assert sum(n for _, n in segs) == last - first + 1
    j = first
    for kv, n in segs:
        for step in range(j, j + n):
            assert t + step <= kv <= cap  # the token fed at this step sits at column <= t + step - 1
            assert kv == kv_bucket(t + step, cap, block)
        j += n
    assert [kv for kv, _ in segs] == sorted({kv for kv, _ in segs})


def test_kv_segments_follow_a_continuous_batch_whose_need_falls():
    """A long request retired mid-way: the need falls and the rounds after it replay the small bucket again."""
    assert kv_segments([5, 5, 300, 300, 6], 1024, 8) == [[8, 2], [512, 2], [8, 1]]
    assert kv_segments([], 64, 8) == []


# ---------------------------------------------------------------------------------------------- the runner
def _counting_graphs(stop_at: int):
    """A real (emulated) step graph: counts its replays on device and raises the done flag at ``stop_at``."""
    count = torch.zeros(1, dtype=torch.int64)
    done = torch.zeros(1, dtype=torch.int32)
    g = EmulatedGraph()

    def step():
        count.add_(1)
        done.copy_((count >= stop_at).to(torch.int32))

    g.capture(step)
    count.zero_()
    done.zero_()
    return StepGraphs("one_stream", {"step": g}, None, ()), count, done


@pytest.mark.parametrize("k", [1, 3, 8])
def test_python_runner_stops_within_two_checks_of_the_done_flag(k):
    graphs, count, done = _counting_graphs(stop_at=10)
    host = torch.zeros(2, dtype=torch.int32)
    ran = run_python(graphs, 100, done, host, k)
    assert ran == count.item()
    assert 10 <= ran <= 10 + 2 * k  # checks every k steps, reading the previous check's flag
    graphs, count, done = _counting_graphs(stop_at=1000)
    assert run_python(graphs, 37, done, host, k) == 37 == count.item()  # never set: every step runs
    with pytest.raises(ValueError):
        run_python(graphs, 5, done, host, 0)


# ---------------------------------------------------------------------------------------------- the decoder
@pytest.fixture(scope="module")
def models():
    base = build_model("llama", seed=0, hidden_size=96, num_attention_heads=6, num_key_value_heads=3)
    value = build_model("llama", seed=1)
    return base, value


def _pair(models, **kw):
    base, value = models
    return FastIVLDecoder(base, value, **kw)


def _assert_same(a, b):
    assert torch.equal(a.sequences, b.sequences)
    assert torch.equal(a.num_new_tokens, b.num_new_tokens)
    if a.logprobs is not None:
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-4, rtol=0)  # batch padding: other GEMM shapes


@pytest.mark.parametrize("mode", ["fused", "two_stream", "one_stream"])
def test_graph_modes_equal_eager_greedy_across_kv_buckets(models, mode):
    eager = _pair(models, graphs="off", kv_block=8)
    graphed = _pair(models, graphs="emulate", graph_mode=mode, kv_block=8)
    a = eager.generate(PROMPTS, **KW)
    b = graphed.generate(PROMPTS, **KW)
    _assert_same(a, b)
    assert b.timings["graphs"] == "emulate" and a.timings["graphs"] == "off"
    # t = 9, 28 steps, blocks of 8: KV buckets 16, 32, 64 -> one graph each
    assert b.timings["graph_captures"] == 3
    # no CUDA extension here: the same graphs replayed from Python
    assert graphed.graph_cache.settings.runner == "python"


@pytest.mark.parametrize("scheme", ["cascade", "cascade+", "base", "value_only"])
def test_other_schemes_replay_sequential_graphs(models, scheme):
    base, value = models
    args = (None, value) if scheme == "value_only" else (base, None if scheme == "base" else value)
    eager = FastIVLDecoder(*args, scheme=scheme, graphs="off")
    graphed = FastIVLDecoder(*args, scheme=scheme, graphs="emulate", graph_mode="fused")
    _assert_same(eager.generate(PROMPTS, **KW), graphed.generate(PROMPTS, **KW))
    modes = {key[0] for key in graphed.graph_cache.captured_keys()}
    assert modes == {"one_stream"}  # graph_mode="fused" asked for, but these schemes run sequentially


def test_graphs_are_reused_across_calls_and_values_change_without_recapture(models):
    dec = _pair(models, graphs="emulate")
    eager = _pair(models, graphs="off")
    kw = dict(max_new_tokens=12, eos_token_id=[], do_sample=True, temperature=0.9, top_k=30, seed=5)
    full = PROMPTS + [[7, 8]]  # 4 rows: the bucket itself (the torch sampler's draws depend on the row count)
    first = dec.generate(full, **kw)
    assert first.timings["graph_captures"] == 1
    again = dec.generate(full, **kw)
    assert again.timings["graph_captures"] == 0 and torch.equal(first.sequences, again.sequences)
    _assert_same(eager.generate(full, **kw), first)
    hotter = dec.generate(full, **{**kw, "temperature": 1.7, "top_k": 5, "seed": 6})  # values live in buffers
    assert hotter.timings["graph_captures"] == 0
    _assert_same(eager.generate(full, **{**kw, "temperature": 1.7, "top_k": 5, "seed": 6}), hotter)
    assert dec.generate(PROMPTS, **kw).timings["graph_captures"] == 0  # 3 rows: same bucket of 4
    assert dec.generate(full + [[9]], **kw).timings["graph_captures"] == 1  # 5 rows: bucket 8
    assert dec.generate(full, **{**kw, "top_p": 0.8}).timings["graph_captures"] == 1  # a new warper: new graph


def test_one_kv_store_serves_every_batch_size_so_graphs_survive_other_calls(models):
    graphed = _pair(models, graphs="emulate")
    eager = FastIVLDecoder(graphed.base, graphed.value, graphs="off")  # the same engines, the same KV store
    kw = dict(max_new_tokens=10, eos_token_id=[])
    assert graphed.generate(PROMPTS, **kw).timings["graph_captures"] == 1  # bucket 4: store of 4 rows
    k0 = graphed.base.k_cache[0]
    eager.generate(PROMPTS[:1], **kw)  # 1 row: a view of the same store, no reallocation
    assert graphed.base.k_cache[0].untyped_storage().data_ptr() == k0.untyped_storage().data_ptr()
    again = graphed.generate(PROMPTS, **kw)
    assert again.timings["graph_captures"] == 0 and graphed.base.k_cache[0] is k0  # the same view object
    _assert_same(eager.generate(PROMPTS, **kw), again)
    eager.generate(PROMPTS + PROMPTS, **kw)  # 6 rows: the store grows, the old graphs are stale
    assert graphed.generate(PROMPTS, **kw).timings["graph_captures"] == 1


def test_capture_graphs_ahead_of_requests(models):
    dec = _pair(models, graphs="emulate", kv_block=8)
    eager = _pair(models, graphs="off", kv_block=8)
    settings = dict(eos_token_id=[], return_logprobs=True)  # those of KW: they select the graphs
    assert dec.capture_graphs(batch_sizes=[3], max_seq_len=64, **settings) == 4  # bucket 4; KV 8, 16, 32, 64
    assert dec.capture_graphs(batch_sizes=[4], max_seq_len=64, **settings) == 0  # same bucket: nothing new
    out = dec.generate(PROMPTS, **KW)  # prompt 9 + 28 new <= 64
    assert out.timings["graph_captures"] == 0
    _assert_same(eager.generate(PROMPTS, **KW), out)
    assert dec.capture_graphs(batch_sizes=[1, 8], max_seq_len=64, **settings) == 8  # buckets 8 and 1
    one = dec.generate(PROMPTS[:1], **KW)  # bucket 1 still has its graphs: bucket 8's store serves it
    assert one.timings["graph_captures"] == 0
    _assert_same(eager.generate(PROMPTS[:1], **KW), one)
    with pytest.raises(ValueError, match="max_seq_len"):
        dec.capture_graphs(max_seq_len=10_000)
    with pytest.raises(TypeError, match="^generation arguments ivl-fast does not know: temperatures "):
        dec.capture_graphs(temperatures=1.0)
    with pytest.raises(ValueError, match="needs graphs enabled"):
        eager.capture_graphs()


def test_kv_store_keeps_the_union_of_shapes_only_while_it_stays_small(models):
    engine = _pair(models).base
    with pytest.raises(RuntimeError, match="allocate"):
        engine.grow(64)
    engine.allocate(2, 32)
    engine.allocate(4, 24)  # union 4 x 32 <= 2 x (4 x 24): kept
    assert (engine.kv.rows, engine.kv.cols) == (4, 32) and engine.k_cache[0].shape[:2] == (4, 32)
    engine.allocate(4, 64)  # grows in length only
    assert (engine.kv.rows, engine.kv.cols) == (4, 64)
    engine.allocate(1, 256)  # union 4 x 256 = 1024 > 2 x (1 x 256): exactly this request instead
    assert (engine.kv.rows, engine.kv.cols) == (1, 256)
    engine.allocate(32, 16)  # 32 x 256 would be 16x the larger request: exactly this one
    assert (engine.kv.rows, engine.kv.cols) == (32, 16) and engine.k_cache[0].shape[:2] == (32, 16)
    engine.free()
    assert engine.kv.rows == 0 and engine.k_cache == []


def test_temperature_zero_sampling_and_a_first_call_under_inference_mode(models):
    eager = _pair(models, graphs="off")
    graphed = _pair(models, graphs="emulate")
    kw = dict(max_new_tokens=10, eos_token_id=[], do_sample=True, temperature=0.0)  # greedy, as transformers
    _assert_same(eager.generate(PROMPTS, max_new_tokens=10, eos_token_id=[]), graphed.generate(PROMPTS, **kw))
    fresh = _pair(models, graphs="emulate")
    with torch.inference_mode():  # a server's first request: the persistent buffers become inference tensors
        first = fresh.generate(PROMPTS, max_new_tokens=10, eos_token_id=[])
    again = fresh.generate(PROMPTS, max_new_tokens=10, eos_token_id=[])  # outside inference mode
    assert torch.equal(first.sequences, again.sequences)


def test_greedy_with_per_row_tensor_parameters_and_no_inference_mode_leak(models):
    eager = _pair(models, graphs="off")
    graphed = _pair(models, graphs="emulate")
    temps = torch.tensor([0.5, 1.0, 2.0])  # [B] tensors with greedy decoding: ignored, never captured
    kw = dict(max_new_tokens=12, eos_token_id=[], temperature=temps, top_k=torch.tensor([1, 2, 3]))
    _assert_same(eager.generate(PROMPTS, **kw), graphed.generate(PROMPTS, **kw))
    for dec in (eager, graphed):
        for _ in dec.stream(PROMPTS, max_new_tokens=4, eos_token_id=[]):
            assert not torch.is_inference_mode_enabled()  # the caller's code between tokens runs normally


def test_emulated_graphs_with_the_fused_triton_sampler_sample_identically(models):
    """The Triton kernel draws Philox(seed; row, column, offset) with the offset advanced on device inside the
    graph: the replayed sampled tokens equal eager ones exactly, padding rows or not."""
    kw = dict(max_new_tokens=8, eos_token_id=[], do_sample=True, temperature=0.8, top_k=20, top_p=0.9, seed=3)
    eager = _pair(models, graphs="off", sample_backend="triton")
    graphed = _pair(models, graphs="emulate", sample_backend="triton")
    _assert_same(eager.generate(PROMPTS, **kw), graphed.generate(PROMPTS, **kw))


def _check_eos_early_exit(eager, graphed):
    """EOS ids the rows really produce at steps 3, 6 and 9: every row stops, and the done flag ends the replay."""
    free = eager.generate(PROMPTS, max_new_tokens=40, eos_token_id=[])
    t = free.prompt_length
    eos = sorted({free.sequences[r, t + s].item() for r, s in ((0, 3), (1, 6), (2, 9))})
    kw = dict(max_new_tokens=40, eos_token_id=eos)
    a, b = eager.generate(PROMPTS, **kw), graphed.generate(PROMPTS, **kw)
    _assert_same(a, b)
    assert b.timings["steps"] < 40  # every row stopped: the done flag ended the replay loop
    assert (b.num_new_tokens <= 10).all()
    assert graphed.generate(PROMPTS, **kw).timings["graph_captures"] == 0  # reused


def test_eos_stops_the_runner_early_and_matches_eager(models):
    _check_eos_early_exit(_pair(models, graphs="off", sync_every=4), _pair(models, graphs="emulate", sync_every=4))


def test_stop_strings_and_streaming_with_graphs(models, tokenizer):
    base, value = models
    eager = FastIVLDecoder(base, value, tokenizer=tokenizer, graphs="off", sync_every=3)
    graphed = FastIVLDecoder(base, value, tokenizer=tokenizer, graphs="emulate", sync_every=3)
    free = eager.generate(PROMPTS, max_new_tokens=20, eos_token_id=[])
    t = free.prompt_length
    stop = tokenizer.decode(free.sequences[1, t + 4 : t + 6].tolist())
    kw = dict(max_new_tokens=20, eos_token_id=[], stop_strings=[stop])
    a, b = eager.generate(PROMPTS, **kw), graphed.generate(PROMPTS, **kw)
    _assert_same(a, b)
    assert b.num_new_tokens[1] <= 6
    streamed = torch.stack(list(graphed.stream(PROMPTS, max_new_tokens=20, eos_token_id=[])), 1)
    assert torch.equal(streamed, free.sequences[:, t:])


def test_non_finite_logits_stop_the_graph_replay_with_the_error(models):
    base, value = models
    bad_value = copy.deepcopy(value)
    with torch.no_grad():
        bad_value.lm_head.weight[7] = float("inf")
    dec = FastIVLDecoder(base, bad_value, graphs="emulate", sync_every=2)
    with pytest.raises(NonFiniteLogitsError, match="non-finite"):
        dec.generate(PROMPTS, max_new_tokens=30, eos_token_id=[])


def test_a_step_that_syncs_is_refused_and_leaves_the_decoder_usable(models):
    dec = _pair(models, graphs="emulate")
    eager = _pair(models, graphs="off")
    real_decode = dec.value.decode

    def syncing_decode(*a, **k):
        out = real_decode(*a, **k)
        _ = float(out[0, 0])  # a host read inside the step
        return out

    dec.value.decode = syncing_decode
    with pytest.raises(GraphCaptureError, match="captured decode step"):
        dec.generate(PROMPTS, max_new_tokens=6, eos_token_id=[])
    dec.value.decode = real_decode
    _assert_same(eager.generate(PROMPTS, **KW), dec.generate(PROMPTS, **KW))


def test_graph_option_errors(models, tokenizer):
    base, value = models
    with pytest.raises(ValueError, match="graphs='cuda' needs the models on a CUDA device"):
        FastIVLDecoder(base, value, graphs="cuda")
    with pytest.raises(ValueError, match="graphs must be one of"):
        FastIVLDecoder(base, value, graphs="sometimes")
    with pytest.raises(ValueError, match="graph_mode must be one of"):
        FastIVLDecoder(base, value, graphs="emulate", graph_mode="three_stream")
    with pytest.raises(ValueError, match="kv_block"):
        FastIVLDecoder(base, value, kv_block=0)
    with pytest.raises(RuntimeError, match="graph_runner='cpp' needs CUDA graphs"):
        FastIVLDecoder(base, value, graphs="emulate", graph_runner="cpp")
    with pytest.raises(ValueError, match="lean engine"):
        FastIVLDecoder(base, value, graphs="emulate", engine="hf")
    auto = FastIVLDecoder(base, value, engine="hf")  # graphs="auto" falls back to eager quietly
    assert auto.generate(PROMPTS, max_new_tokens=3).timings["graphs"] == "off"
    cpu = FastIVLDecoder(base, value)  # no CUDA: auto means eager
    assert cpu.generate(PROMPTS, max_new_tokens=3).timings["graphs"] == "off" and cpu.graph_captures == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["fused", "two_stream", "one_stream"])
@pytest.mark.parametrize("runner", ["python", "cpp"])
def test_cuda_graphs_equal_eager(models, mode, runner):
    from ivl_fast.graphs import cpp_runner_available

    if runner == "cpp" and not cpp_runner_available():
        pytest.skip("the extension was built without CUDA")
    base, value = (copy.deepcopy(m).cuda() for m in models)
    eager = FastIVLDecoder(base, value, graphs="off", kv_block=8)
    graphed = FastIVLDecoder(base, value, graphs="cuda", graph_mode=mode, graph_runner=runner, kv_block=8)
    for kw in (KW, dict(max_new_tokens=20, eos_token_id=[], do_sample=True, temperature=0.8, top_p=0.9, seed=1)):
        _assert_same(eager.generate(PROMPTS, **kw), graphed.generate(PROMPTS, **kw))
    _check_eos_early_exit(eager, graphed)


def test_each_bucket_graph_attends_to_its_own_kv_columns(models, monkeypatch):
    """A step graph captured for a KV bucket hands both engines that bucket as kv_len (the columns a decode
    attends to), so a round costs its bucket, not the whole cache: t = 9, 28 steps, blocks of 8 -> 16, 32, 64."""
    graphed = _pair(models, graphs="emulate", graph_mode="fused", kv_block=8)
    seen: dict[str, list] = {"base": [], "value": []}
    for side in seen:
        engine = getattr(graphed.models, side)
        decode = engine.decode

        def spy(ids, *args, _decode=decode, _seen=seen[side], **kw):
            _seen.append(kw.get("kv_len"))
            return _decode(ids, *args, **kw)

        monkeypatch.setattr(engine, "decode", spy)
    out = graphed.generate(PROMPTS, **KW)
    assert out.timings["graph_captures"] == 3
    assert seen == {"base": [16, 32, 64], "value": [16, 32, 64]}  # one capture per bucket, replayed after
