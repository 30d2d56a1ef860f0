"""Graph-captured decode: each decode step captured once per (batch bucket, KV-length bucket), then replayed.

NOT YET VALIDATED ON GPU. The CUDA path (``torch.cuda.CUDAGraph`` capture, the two-stream fork/join, the C++
replay runner ``torch.ops.ivl_fast.replay_graphs``) has been written against the CUDA runtime and torch's
documented capture rules and compiled against a CUDA build of torch, but no GPU was available to run it. What
is validated (on CPU, in the test suite) is everything that does not need a GPU: the decode step's graph safety
(no host syncs, static buffers updated in place, RNG offset / positions / step counter advanced on device), the
bucketing, the Python replay runner and the equality of graph replay with eager decoding, through
:class:`EmulatedGraph`, which replays a recorded step with CUDA-graph semantics on any device.

Pieces:

- :class:`EmulatedGraph`: records the aten ops of one call (a ``TorchDispatchMode``) and replays exactly those
  ops on the same static tensors, with every Python value baked in, as a CUDA graph would. Host syncs
  (``.item()``, ``nonzero``, ...) during capture raise :class:`GraphCaptureError`, as stream capture would.
  Outputs of the captured call are static: replay overwrites them in place.
- :class:`CudaGraph`: ``torch.cuda.CUDAGraph`` behind the same interface (capture on a side stream, shared
  memory pool, raw ``cudaGraphExec_t`` for the C++ runner).
- :func:`fork_join`: the two models on two CUDA streams (inside or outside a capture), joined before sampling.
- :class:`StepGraphs`: the graph(s) of one decode step in one of three layouts (``GRAPH_MODES``):
  ``fused`` (one graph holding the fork/join of both streams plus sampling), ``two_stream`` (one graph per
  model and one for sampling, replayed on two streams with events) and ``one_stream`` (one graph, everything
  sequential on one stream; the cascade schemes and single-model schemes use it).
- Runners: :func:`run_python` and :func:`run_cpp` replay N steps back to back and look at the device's "done"
  flag (every row stopped, or a non-finite row) through host memory every ``check_every`` steps, one check
  behind, so the device never waits for the host. ``run_cpp`` is the same loop in C++ (CUDA builds only).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

GRAPH_MODES = ("fused", "two_stream", "one_stream")
GRAPH_OPTIONS = ("auto", "cuda", "emulate", "off")
RUNNERS = ("auto", "cpp", "python")
KV_BUCKET_MIN = 256  # smallest KV-length bucket (columns attended per decode step)


class GraphCaptureError(RuntimeError):
    """The decode step did something a CUDA graph cannot hold (a host sync, a data-dependent shape)."""


# ---------------------------------------------------------------------------------------------- buckets
def batch_bucket(b: int) -> int:
    """Rows are padded to the next power of two, so a handful of graphs serves every batch size."""
    if b < 1:
        raise ValueError(f"batch size must be >= 1, got {b}")
    return 1 << (b - 1).bit_length()


def kv_bucket(n: int, capacity: int, minimum: int = KV_BUCKET_MIN) -> int:
    """KV columns a decode step attends to when no position is >= n: the next power-of-two multiple of
    ``minimum`` (so attention cost follows the sequence, not the cache size), at most ``capacity``."""
    if n > capacity:
        raise ValueError(f"{n} KV columns needed but the cache holds {capacity}")
    if n <= minimum:
        return min(minimum, capacity)
    return min(capacity, minimum << math.ceil(math.log2(n / minimum)))


def kv_segments(needs, capacity: int, minimum: int = KV_BUCKET_MIN) -> list[list[int]]:
    """Consecutive rounds, given the KV columns each needs (``needs``: one int per round, in order), split into
    runs of one KV bucket: [[kv_len, n_rounds], ...] (a graph replay per run)."""
    out: list[list[int]] = []
    for need in needs:
        kv = kv_bucket(need, capacity, minimum)
        if out and out[-1][0] == kv:
            out[-1][1] += 1
        else:
            out.append([kv, 1])
    return out


# ---------------------------------------------------------------------------------------------- emulation
def _sync_ops() -> set:
    aten = torch.ops.aten
    names = [
        ("_local_scalar_dense", "default"),
        ("item", "default"),
        ("nonzero", "default"),
        ("masked_select", "default"),
        ("is_nonzero", "default"),
        ("equal", "default"),
        ("_unique2", "default"),
        ("unique_consecutive", "default"),
        ("unique_dim", "default"),
        ("repeat_interleave", "Tensor"),
        ("allclose", "default"),
    ]
    ops = set()
    for name, overload in names:
        packet = getattr(aten, name, None)
        if packet is not None and hasattr(packet, overload):
            ops.add(getattr(packet, overload))
    return ops


_SYNC_OPS = _sync_ops()
# indexing with a boolean mask has a data-dependent shape (x[mask]) or finds its positions with nonzero
_INDEX_OPS = {torch.ops.aten.index.Tensor, torch.ops.aten.index_put_.default, torch.ops.aten.index_put.default}


def _has_mask_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


class _Recorder(TorchDispatchMode):
    def __init__(self, tape: list):
        super().__init__()
        self.tape = tape

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SYNC_OPS or (func in _INDEX_OPS and _has_mask_index(args)):
            raise GraphCaptureError(
                f"{func} needs a device value on the host (a synchronisation or a data-dependent shape) inside a "
                "captured decode step; CUDA graph capture would fail here"
            )
        out = func(*args, **kwargs)
        self.tape.append((func, args, kwargs, out))
        return out


class EmulatedGraph:
    """CUDA-graph semantics on any device: ``capture(fn)`` runs ``fn`` once while recording its aten ops;
    ``replay()`` runs exactly those ops again on the same tensors.

    As with a CUDA graph: tensors that existed before capture (weights, static buffers) are read and written at
    the same "addresses" (the same tensor objects); tensors created inside are recreated per replay; every
    Python value (shapes, scalars, branches taken) is frozen at capture; rebinding a Python attribute after
    capture has no effect on the replay; the tensors ``fn`` returned are overwritten in place by each replay.
    Host syncs inside ``fn`` raise :class:`GraphCaptureError`. Unlike CUDA capture, capture also executes ``fn``
    (callers snapshot and restore their state around capture either way). Used to validate the graph path
    without a GPU; the ops run at eager speed.
    """

    kind = "emulate"

    def __init__(self):
        self._tape: list = []
        self._outputs: list[torch.Tensor] = []
        self.captured = False

    def capture(self, fn: Callable[[], object], **_unused) -> object:
        if self.captured:
            raise RuntimeError("this graph was already captured")
        with _Recorder(self._tape):
            out = fn()
        leaves, _ = tree_flatten(out)
        self._outputs = [t for t in leaves if isinstance(t, torch.Tensor)]
        self.captured = True
        return out

    def replay(self) -> None:
        if not self.captured:
            raise RuntimeError("replay() before capture()")
        env: dict[int, torch.Tensor] = {}

        def sub(x):
            return env.get(id(x), x) if isinstance(x, torch.Tensor) else x

        for func, args, kwargs, out in self._tape:
            new = func(*tree_map(sub, args), **tree_map(sub, kwargs))
            old_leaves, _ = tree_flatten(out)
            new_leaves, _ = tree_flatten(new)
            for o, n in zip(old_leaves, new_leaves, strict=True):
                if isinstance(o, torch.Tensor):
                    env[id(o)] = n
        for o in self._outputs:
            n = env.get(id(o))
            if n is not None and n is not o:
                o.copy_(n)

    @property
    def num_ops(self) -> int:
        return len(self._tape)


class CudaGraph:
    """``torch.cuda.CUDAGraph`` behind the interface of :class:`EmulatedGraph` (not yet validated on GPU)."""

    kind = "cuda"

    def __init__(self, pool=None):
        self.graph = torch.cuda.CUDAGraph()
        self.pool = pool
        self.captured = False

    def capture(self, fn: Callable[[], object], stream: torch.cuda.Stream | None = None) -> object:
        if self.captured:
            raise RuntimeError("this graph was already captured")
        with torch.cuda.graph(self.graph, pool=self.pool, stream=stream, capture_error_mode="thread_local"):
            out = fn()
        self.captured = True
        return out

    def replay(self) -> None:
        self.graph.replay()

    def exec_handle(self) -> int:
        """The instantiated ``cudaGraphExec_t`` as an integer, for the C++ runner."""
        return int(self.graph.raw_cuda_graph_exec())


def new_graph(kind: str, pool=None):
    if kind == "cuda":
        return CudaGraph(pool)
    if kind == "emulate":
        return EmulatedGraph()
    raise ValueError(f"graph kind must be 'cuda' or 'emulate', got {kind!r}")


# ---------------------------------------------------------------------------------------------- streams
def fork_join(main_fn: Callable[[], object], side_fn: Callable[[], object], side: torch.cuda.Stream | None):
    """Run ``main_fn`` on the current stream and ``side_fn`` on ``side`` concurrently (CUDA; inside a capture
    this records the fork and the join into the graph), then join: -> (main result, side result).
    Without a side stream (CPU, emulation) the two run one after the other."""
    if side is None:
        return main_fn(), side_fn()
    main = torch.cuda.current_stream()
    side.wait_stream(main)  # fork: the side stream sees everything issued so far
    with torch.cuda.stream(side):
        b = side_fn()
    a = main_fn()
    main.wait_stream(side)  # join: sampling waits for both models
    return a, b


# ---------------------------------------------------------------------------------------------- step graphs
class StepGraphs:
    """The graph(s) of one decode step.

    ``parts``: ``{"step": g}`` for the fused and one_stream layouts, ``{"base": g, "value": g, "sample": g}``
    for two_stream (base and sample on the main stream, value on the side stream).
    """

    def __init__(self, mode: str, parts: dict, side: torch.cuda.Stream | None, key: tuple):
        if mode not in GRAPH_MODES:
            raise ValueError(f"graph mode must be one of {GRAPH_MODES}, got {mode!r}")
        self.mode, self.parts, self.side, self.key = mode, parts, side, key
        self._events = None

    def replay_step(self) -> None:
        """One decode step from Python (the fallback runner's body)."""
        if self.mode != "two_stream":
            self.parts["step"].replay()
            return
        if self.side is None:  # CPU / emulation: stream order is program order
            for name in ("base", "value", "sample"):
                self.parts[name].replay()
            return
        main = torch.cuda.current_stream()
        if self._events is None:
            self._events = (torch.cuda.Event(), torch.cuda.Event())
        fork, join = self._events
        fork.record(main)
        self.side.wait_event(fork)
        with torch.cuda.stream(self.side):
            self.parts["value"].replay()
        self.parts["base"].replay()
        join.record(self.side)
        main.wait_event(join)
        self.parts["sample"].replay()

    def exec_handles(self) -> list[int]:
        names = ["step"] if self.mode != "two_stream" else ["base", "value", "sample"]
        return [self.parts[n].exec_handle() for n in names]


def run_python(graphs: StepGraphs, n_steps: int, done: torch.Tensor, host: torch.Tensor, check_every: int) -> int:
    """Replay ``n_steps`` decode steps; every ``check_every`` steps copy the device's done flag (int32 [1]) to
    ``host`` (int32 [2], pinned on CUDA) without waiting, then look at the flag of the previous check (so the
    device keeps a queue of work). Returns the number of steps issued (fewer than n_steps when the flag was set:
    every row stopped or a row went non-finite). Same loop as the C++ runner."""
    if n_steps < 0 or check_every < 1:
        raise ValueError(f"n_steps must be >= 0 and check_every >= 1, got {n_steps}, {check_every}")
    cuda = done.device.type == "cuda"
    # the host waits on these for up to check_every steps of device work: block rather than spin a core
    events = [torch.cuda.Event(blocking=True), torch.cuda.Event(blocking=True)] if cuda else [None, None]
    pending = [False, False]
    host[:2] = 0
    slot = 0
    for i in range(1, n_steps + 1):
        graphs.replay_step()
        if i % check_every == 0 and i < n_steps:
            host[slot : slot + 1].copy_(done, non_blocking=cuda)
            if cuda:
                events[slot].record()
            pending[slot] = True
            prev = slot ^ 1
            if pending[prev]:
                if cuda:
                    events[prev].synchronize()
                pending[prev] = False
                if int(host[prev]):
                    return i
            slot = prev
    return n_steps


def run_cpp(graphs: StepGraphs, n_steps: int, done: torch.Tensor, host: torch.Tensor, check_every: int) -> int:
    """:func:`run_python` in C++ (``torch.ops.ivl_fast.replay_graphs``; CUDA builds of the extension only;
    NOT YET VALIDATED ON GPU)."""
    if not cpp_runner_available():
        raise RuntimeError(
            "the C++ graph runner needs the ivl_fast._C extension built with CUDA (pip install --no-build-isolation "
            "-e . with a CUDA build of torch); use graph_runner='python'"
        )
    main = torch.cuda.current_stream().cuda_stream
    streams = [main] if graphs.mode != "two_stream" else [main, graphs.side.cuda_stream]
    return int(torch.ops.ivl_fast.replay_graphs(graphs.exec_handles(), streams, n_steps, done, host, check_every))


def cpp_runner_available() -> bool:
    from ._ext import extension_available

    return (
        extension_available()
        and hasattr(torch.ops.ivl_fast, "replay_graphs")
        and hasattr(torch.cuda.CUDAGraph, "raw_cuda_graph_exec")  # torch exposes the cudaGraphExec_t (>= 2.8)
    )


def resolve_graphs(option, device: torch.device) -> str | None:
    """The decoder's ``graphs=`` option -> "cuda", "emulate" or None (eager)."""
    if option is True:
        option = "cuda"
    if option is False or option is None:
        option = "off"
    if option not in GRAPH_OPTIONS:
        raise ValueError(f"graphs must be one of {GRAPH_OPTIONS} (or a bool), got {option!r}")
    if option == "off":
        return None
    if option == "auto":
        return "cuda" if device.type == "cuda" else None
    if option == "cuda" and device.type != "cuda":
        raise ValueError(f"graphs='cuda' needs the models on a CUDA device, they are on {device}")
    return option


def resolve_runner(option: str, kind: str) -> str:
    if option not in RUNNERS:
        raise ValueError(f"graph_runner must be one of {RUNNERS}, got {option!r}")
    if option == "cpp" and (kind != "cuda" or not cpp_runner_available()):
        raise RuntimeError(
            "graph_runner='cpp' needs CUDA graphs and the ivl_fast._C extension built with CUDA "
            f"(graphs: {kind}, extension with CUDA: {cpp_runner_available()})"
        )
    if option == "auto":
        return "cpp" if kind == "cuda" and cpp_runner_available() else "python"
    return option
