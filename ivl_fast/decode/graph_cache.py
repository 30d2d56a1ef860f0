"""Captured decode steps, kept per batch bucket with everything they captured: the persistent buffers, the graphs
(one per step layout x KV bucket x sampling shape), their memory pools and the streams.

NOT YET VALIDATED ON GPU (see :mod:`ivl_fast.graphs`). Invalidation is explicit: a bucket records the version of
every engine's KV store its graphs read (``StaticKVCache.version``, bumped by each reallocation) and drops its
graphs when one moved; ``clear()`` drops everything (``FastIVLDecoder.release_graphs``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..checks import check_int
from ..graphs import GRAPH_MODES, KV_BUCKET_MIN, StepGraphs, new_graph, resolve_graphs, resolve_runner
from ..ops._backend import pick_backend
from .buffers import DecodeBuffers


@dataclass(frozen=True)
class GraphSettings:
    """kind: "cuda", "emulate" or None (eager); mode: the step layout (:data:`ivl_fast.graphs.GRAPH_MODES`);
    runner: "cpp" or "python"; kv_block: the smallest KV bucket."""

    kind: str | None = None
    mode: str = "fused"
    runner: str = "python"
    kv_block: int = KV_BUCKET_MIN

    @classmethod
    def resolve(cls, graphs, mode: str, runner: str, kv_block: int, models) -> GraphSettings:
        """The decoder's options -> settings (ValueError naming an option that cannot hold; an explicit
        graphs="cuda" / "emulate" that these models cannot use is refused, "auto" falls back to eager)."""
        check_int(kv_block, "kv_block", 1)
        if mode not in GRAPH_MODES:
            raise ValueError(f"graph_mode must be one of {GRAPH_MODES}, got {mode!r}")
        kind = resolve_graphs(graphs, models.device)
        runner = resolve_runner(runner, kind or "off") if kind else "python"
        if kind is not None and graphs != "auto":
            why = graph_obstacle(models, kind, pick_backend(models.sample_backend, models.device))
            if why:
                raise ValueError(f"graphs={graphs!r}: {why}")
        return cls(kind, mode, runner, kv_block)


@dataclass
class _Bucket:
    buffers: DecodeBuffers
    graphs: dict = field(default_factory=dict)  # graph key -> StepGraphs
    pools: dict = field(default_factory=dict)  # CUDA graph memory pools (dropped with the graphs, never reused)
    versions: tuple = ()  # the KV store versions the graphs captured
    extras: dict = field(default_factory=dict)  # other persistent state the graphs read (name -> object)


class GraphCache:
    def __init__(self, settings: GraphSettings, device: torch.device):
        self.settings, self.device = settings, device
        self.captures = 0  # graphs captured so far, all buckets
        self._buckets: dict[int, _Bucket] = {}
        self._streams = None

    def buffers(self, bucket, rows: int, cols: int, vocab: int, backend: str) -> DecodeBuffers:
        """The persistent buffers of ``bucket`` (a batch bucket's row count, or ("continuous", rows) for a
        persistent batch, which owns its own) of ``rows`` rows, holding at least ``cols`` output columns (new ones,
        and no graphs, when the old ones are too small)."""
        b = self._buckets.get(bucket)
        if b is None or not b.buffers.fits(rows, cols, backend):
            b = self._buckets[bucket] = _Bucket(DecodeBuffers(rows, cols, vocab, self.device, backend))
        return b.buffers

    def persistent(self, bucket, name: str, make: Callable[[], object]):
        """Persistent state of ``bucket`` besides its buffers that its graphs read and write (made by ``make()``
        once; replaced together with the buffers)."""
        extras = self._buckets[bucket].extras
        if name not in extras:
            extras[name] = make()
        return extras[name]

    def streams(self):
        """(capture stream, side stream): graphs are warmed up and captured on the stream they will use, so each
        cuBLAS workspace baked into a graph belongs to one stream (two graphs replayed concurrently must not
        share one) and is created before capture, outside the graphs' memory pools."""
        if self._streams is None:
            self._streams = (torch.cuda.Stream(device=self.device), torch.cuda.Stream(device=self.device))
        return self._streams

    def get(self, bucket, key: tuple, versions: tuple, capture: Callable[[Callable], StepGraphs], mutable):
        """The graphs of ``key`` for ``bucket`` -> (graphs, captured now). On a miss ``capture(pool)`` builds them;
        ``mutable`` (tensors and the torch RNG) is restored after, since warm-up ran the step."""
        b = self._buckets[bucket]
        if versions != b.versions:  # a KV store was reallocated: every graph of this bucket read the old one
            b.graphs.clear()
            b.pools.clear()
            b.versions = versions
        graphs = b.graphs.get(key)
        if graphs is not None:
            return graphs, False
        tensors, gen = mutable
        saved = [(x, x.clone()) for x in tensors], gen.get_state()
        try:

            def pool(i: int):
                if self.settings.kind != "cuda":
                    return None
                if i not in b.pools:
                    b.pools[i] = torch.cuda.graph_pool_handle()
                return b.pools[i]

            graphs = capture(pool)
        finally:
            for x, old in saved[0]:
                x.copy_(old)
            gen.set_state(saved[1])
        b.graphs[key] = graphs
        self.captures += 1
        return graphs, True

    def obstacle(self, models) -> str | None:
        """Why runs of ``models`` decode eagerly under these settings (None: they are captured)."""
        if self.settings.kind is None:
            return "graphs are off"
        return graph_obstacle(models, self.settings.kind, pick_backend(models.sample_backend, models.device))

    def for_models(self, models) -> GraphCache | None:
        """This cache when runs of ``models`` are captured, else None (eager)."""
        return None if self.obstacle(models) else self

    def captured_keys(self) -> list[tuple]:
        """The keys of every graph held, all buckets (layout, KV bucket, sampling shape, ...)."""
        return [k for b in self._buckets.values() for k in b.graphs]

    def clear(self) -> None:
        self._buckets.clear()


def capture_step(kind: str, mode: str, key: tuple, streams, pool, step_fn, base_fn, value_fn, emit_fn) -> StepGraphs:
    """Warm up and capture one decode step's graph(s) in layout ``mode``.

    ``step_fn(side)``: the whole step (models + sampling; ``side``: the value model's stream in the fused layout);
    two_stream captures ``base_fn()``, ``value_fn()`` and ``emit_fn(zb, zv)`` separately. CUDA: each graph is
    warmed up on the very stream it is captured on (lazy inits such as cuBLAS workspaces and Triton compilation
    happen outside the capture, per stream); the value model of two_stream is captured on the side stream, with
    its own memory pool, since it replays concurrently with the base's graph."""
    cuda = kind == "cuda"
    cap, side = streams if cuda else (None, None)

    def warm(fn, stream):
        if not cuda:
            return None
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            out = fn()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        return out

    if mode != "two_stream":
        fork = side if mode == "fused" else None
        warm(lambda: step_fn(fork), cap)
        g = new_graph(kind, pool(0))
        g.capture(lambda: step_fn(fork), stream=cap)
        return StepGraphs(mode, {"step": g}, fork, key)
    zb_w, zv_w = warm(base_fn, cap), warm(value_fn, side)
    if cuda:  # the sampler's warm-up on real logits (the captured outputs hold nothing until replayed)
        warm(lambda: emit_fn(zb_w, zv_w), cap)
        del zb_w, zv_w
    gb = new_graph(kind, pool(0))
    zb = gb.capture(base_fn, stream=cap)
    gv = new_graph(kind, pool(1))
    zv = gv.capture(value_fn, stream=side)
    gs = new_graph(kind, pool(0))
    gs.capture(lambda: emit_fn(zb, zv), stream=cap)
    return StepGraphs(mode, {"base": gb, "value": gv, "sample": gs}, side, key)


def graph_obstacle(models, kind: str | None, backend: str) -> str | None:
    """Why decode steps of ``models`` cannot be captured (None: they can)."""
    if models.cross_vocab:
        return "cross-vocabulary decoding re-tokenizes on the host every step (it runs eagerly)"
    if not models.all_support("graphs"):
        return "graphs need the lean engine for every model (the transformers adapter's cache is dynamic)"
    if kind == "cuda" and backend != "triton":
        return "CUDA graphs need the fused Triton sampler (sample_backend='auto' or 'triton')"
    return None
