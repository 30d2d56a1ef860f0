"""SpeculativeLoop: a generate() batch decoded in speculative rounds (:mod:`ivl_fast.decode.speculative`).

Prefill: the base, the draft and the value network read the prompts; the first token comes from the target
distribution exactly as in plain decoding (:func:`ivl_fast.decode.step.sample`). Then rounds, each emitting 1 to
k + 1 tokens per row, eagerly or as one captured graph per KV bucket (static k). The host syncs once per round
(NaN/inf, every row finished, the longest row: one small read); stop strings are checked on the host after each
round, as :class:`~ivl_fast.decode.loop.DecodeLoop` checks them.

The KV caches hold prompt + max_new_tokens + k + 1 columns: inside a round every row reads up to k + 1 tokens
past what it keeps, and finished rows are rewound to where they stopped.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch

from ..checks import check_int
from ..graphs import StepGraphs, kv_bucket, new_graph
from ..models.engine import graph_safe
from ..ops._backend import pick_backend
from .buffers import DecodeBuffers
from .graph_cache import GraphCache
from .model_set import ModelSet
from .options import GenerationOptions
from .slot_table import SlotTable
from .speculative import SpecConfig, SpecState, speculative_round
from .step import StepConfig, emit, prefill_logits, sample
from .stops import StopStringScanner, cut_at_stop_strings, nonfinite_error


class SpeculativeLoop:
    """``rows`` prompts of up to ``max_new_tokens`` new tokens each, drafted ``k`` at a time by ``draft`` (+ the
    value network) and verified by the base. ``graph_cache``: capture each round (None: eager)."""

    def __init__(
        self,
        models: ModelSet,
        draft,
        options: GenerationOptions,
        *,
        k: int,
        rows: int,
        capacity: int,
        graph_cache: GraphCache | None = None,
        stops: StopStringScanner | None = None,
    ):
        self.models, self.draft, self.opts, self.k = models, draft, options, k
        self.capacity, self.stops = capacity, stops
        n = options.max_new_tokens
        self.backend = pick_backend(models.sample_backend, models.device)
        self.graph_kind = graph_cache.settings.kind if graph_cache is not None else None
        self.cache = graph_cache if self.graph_kind else None
        cols = n + k  # a round writes up to k + 1 columns past a row's last; the spare column takes the rest
        if self.cache is not None:
            self.bucket = ("speculative", rows, k)
            self.bufs = self.cache.buffers(self.bucket, rows, cols, models.sampled_vocab, self.backend)
        else:
            self.bucket = None
            self.bufs = DecodeBuffers(rows, cols, models.sampled_vocab, models.device, self.backend)
        self.rows = rows
        sp = options.sampling
        # the first token: plain decoding's sampler, eager (per-row bookkeeping: budgets end rows on device)
        self.first_cfg = StepConfig(sp, options.return_logprobs, self.backend, False, len(options.eos_token_id), True)
        self.cfg = SpecConfig(k, sp, options.return_logprobs, len(options.eos_token_id))
        seed = options.seed or 0
        if options.seed is None and not sp.greedy:
            seed = int(torch.randint(0, 2**62, (1,)))  # fresh entropy from the global RNG (greedy runs use none)
        with torch.inference_mode():
            self.bufs.reset(options.pad_token_id, int(seed))
            self.eos = self.bufs.eos_buffer(options.eos_token_id)
        if self.cache is not None:  # graphs captured by an earlier call read this bucket's state tensors
            self.state = self.cache.persistent(self.bucket, "spec", lambda: SpecState.new(rows, models.device))
        else:
            self.state = SpecState.new(rows, models.device)
        with torch.inference_mode():
            self.state.drafted.zero_()
            self.state.accepted.zero_()
        self.rounds = 0
        self.steps = 0  # output columns every row has (the generate() view: the longest row's new tokens)
        self.prefill_s = 0.0
        self.captures = 0
        self.prompt: torch.Tensor | None = None
        self.table = SlotTable(rows)  # the started rows: prompt lengths, budgets, tokens stop-string scanned
        for e in self.engines:
            e.allocate(rows, capacity)

    @property
    def engines(self) -> list:
        return [*self.models.engines, self.draft]

    def on_device(self):
        dev = self.models.device
        return torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()

    # ------------------------------------------------------------------ prefill
    def start(self, prompt: torch.Tensor, mask: torch.Tensor) -> None:
        """Prefill left-padded prompts [B, T] into every model and emit each row's first token."""
        m, bufs = self.models, self.bufs
        b = prompt.shape[0]
        self.prompt = prompt
        rows = torch.arange(b, device=m.device)
        with torch.inference_mode(), self.on_device():
            bufs.admit(rows, self.opts.max_new_tokens, self.opts.sampling, prompt, mask)
            t0 = time.perf_counter()
            zb, zv = prefill_logits(m, prompt, mask)
            self.draft.prefill(prompt, mask)  # its logits are unused: a round starts by reading [p, y]
            self.draft.rewind(mask.sum(1) - 1)  # p: the prompt's last token, read again with y (same K/V)
            self.state.prev.copy_(prompt[:, -1])
            self.prefill_s = time.perf_counter() - t0
            emit(bufs, self.first_cfg, self.eos, *sample(m, bufs, self.first_cfg, zb, zv))
        for r, length in enumerate(mask.sum(1).tolist()):
            self.table.add(r, int(length), self.opts.max_new_tokens)
        self.steps = 1

    # ------------------------------------------------------------------ rounds
    def _round(self) -> None:
        need = self.table.longest_prompt() + self.steps + self.k  # every row's pending position + k + 1 (host mirror)
        kv = (
            min(need, self.capacity)
            if self.cache is None
            else kv_bucket(need, self.capacity, self.cache.settings.kv_block)
        )
        if self.cache is None or not graph_safe([*self.models.engines, self.draft], kv):  # (longrope past its switch)
            speculative_round(self.models, self.draft, self.bufs, self.cfg, self.eos, kv, self.state)
        else:
            self.graphs(kv).replay_step()
        self.rounds += 1

    def graphs(self, kv_len: int) -> StepGraphs:
        """The captured round of KV bucket ``kv_len`` (captured on a miss)."""
        m, bufs, cfg, eos, state = self.models, self.bufs, self.cfg, self.eos, self.state
        key = cfg.graph_key(kv_len, m.alpha)
        versions = tuple(e.cache_version for e in self.engines)
        mutable = (bufs.mutable() + [t for e in self.engines for t in e.step_state()] + state.tensors(), bufs.gen)
        kind = self.cache.settings.kind

        def run():
            speculative_round(m, self.draft, bufs, cfg, eos, kv_len, state)

        def capture(pool):
            if kind == "cuda":  # warm up on the capture stream (lazy inits outside the graph)
                cap = self.cache.streams()[0]
                cap.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(cap):
                    run()
                torch.cuda.current_stream().wait_stream(cap)
                torch.cuda.synchronize()
                g = new_graph(kind, pool(0))
                if not cfg.sampling.greedy:  # the round draws from the buffers' torch generator
                    g.graph.register_generator_state(bufs.gen)
                g.capture(run, stream=cap)
            else:
                g = new_graph(kind, pool(0))
                g.capture(run)
            return StepGraphs("one_stream", {"step": g}, None, key)

        graphs, new = self.cache.get(self.bucket, key, versions, capture, mutable)
        self.captures += int(new)
        return graphs

    def _sync(self) -> tuple[bool, int]:
        """The round's one host read: NaN/inf, every row finished, the longest row, the output columns every row
        has (finished rows: up to their last token); -> (every row finished, columns ready)."""
        b, bufs = len(self.table), self.bufs
        fin, steps = bufs.finished[:b], bufs.steps[:b]
        ends = torch.where(fin, bufs.stop_step[:b] + 1, steps)
        ready = torch.where(fin, torch.full_like(steps, 1 << 40), steps).min()  # unfinished rows' columns
        flags = torch.stack([bufs.bad[:b].any().to(torch.int64), fin.all().to(torch.int64), steps.max(), ready])
        bad, done, longest, ready = flags.tolist()
        if bad:
            rows = bufs.bad[:b].nonzero().flatten().tolist()
            raise nonfinite_error(rows, 0, longest)
        self.steps = max(self.steps, longest)
        if self.stops is not None:
            emitted = dict(enumerate(steps.tolist()))
            cut_at_stop_strings(bufs, self.stops, self.table.checked, emitted, self.opts.pad_token_id)
            fin = bufs.finished[:b]
            done = bool(fin.all())
            ends = torch.where(fin, bufs.stop_step[:b] + 1, steps)
            ready = int(torch.where(fin, torch.full_like(steps, 1 << 40), steps).min())
        if done:
            ready = int(ends.max())
        return bool(done), min(int(ready), self.opts.max_new_tokens)

    def __iter__(self) -> Iterator[torch.Tensor]:
        """After :meth:`start`: yield the ids [B] of each output column once every row has it (finished rows:
        pad), until every row stopped."""
        b = len(self.table)
        n = self.opts.max_new_tokens
        yielded = 0
        with torch.inference_mode(), self.on_device():
            done, ready = self._sync()
        while True:
            with torch.inference_mode():
                cols = [self.bufs.out[:b, c].clone() for c in range(yielded, ready)]
            yielded = ready
            yield from cols
            if done or yielded >= n:
                break
            with torch.inference_mode(), self.on_device():
                self._round()
                done, ready = self._sync()
        if done:  # the columns after the last row stopped are not steps
            self.steps = yielded

    def num_new_tokens(self, b: int) -> torch.Tensor:
        bufs = self.bufs
        n = torch.where(bufs.finished[:b], bufs.stop_step[:b] + 1, bufs.steps[:b])
        return torch.clamp(n, max=self.steps)

    def timings(self) -> dict:
        """rounds, drafted and accepted tokens (live rows) and the acceptance rate of this run (host sync)."""
        drafted, accepted = int(self.state.drafted), int(self.state.accepted)
        return {
            "rounds": self.rounds,
            "num_draft_tokens": self.k,
            "drafted": drafted,
            "accepted": accepted,
            "acceptance_rate": accepted / drafted if drafted else 0.0,
        }


def check_draft(models: ModelSet, draft, k) -> None:
    """The draft base fits speculative decoding of ``models`` (ValueError naming what does not)."""
    check_int(k, "num_draft_tokens", 1)
    if models.terms:
        raise ValueError("a draft model and logit terms cannot be combined yet (speculative rounds combine two)")
    if models.scheme not in ("residual", "base"):
        raise ValueError(
            f"a draft model needs scheme 'residual' or 'base', got {models.scheme!r} (a cascade value network reads "
            "the base's distribution, which the draft phase does not have)"
        )
    if models.cross_vocab:
        raise ValueError("a draft model and a vocab_map cannot be combined (speculation needs one vocabulary)")
    # one tokenizer under padded embeddings (ModelSet.real_vocab): the draft needs rows for the real ids only (a
    # round reads its logits through speculative._combine, cut to models.sampled_vocab)
    padded = models.real_vocab is not None and draft.vocab_size >= models.real_vocab
    if draft.vocab_size != models.base.vocab_size and not padded:
        raise ValueError(
            f"the draft model's vocabulary ({draft.vocab_size} tokens) differs from the base's "
            f"({models.base.vocab_size}); the draft must share the base's tokenizer (one tokenizer padded to "
            "different sizes counts as one: pass it as tokenizer=..., or load checkpoints that include it)"
        )
    if draft.device != models.base.device:
        raise ValueError(f"the draft model is on {draft.device} but the base model on {models.base.device}")
    for name, e in (("base", models.base), ("value", models.value), ("draft", draft)):
        if e is not None and e in [*models.engines, draft] and not (e.supports_graphs and e.supports_rewind):
            raise ValueError(f"speculative decoding needs the lean engine for the {name} model (Llama/Mistral/Qwen2)")
    if not getattr(models.base, "supports_extend", False):
        raise ValueError("speculative decoding needs a base engine that verifies several tokens at once (extend)")


__all__ = ["SpeculativeLoop", "check_draft"]
