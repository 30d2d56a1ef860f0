"""DecodeLoop: one persistent batch of slots and the loop that steps it.

Prefill (a batch at once, or one request into a free slot between steps), then decode rounds: eager steps, or
captured graphs replayed by the C++ / Python runner in chunks between host checks. Each round is one call of
:func:`ivl_fast.decode.step.decode_step` (or its graph); the host syncs only at the batched stop check (every
``sync_every`` rounds), where NaN/inf and stop strings are looked at. Across vocabularies the loop feeds the base
what the :class:`~ivl_fast.decode.cross_vocab.Retokenizer` says after every round (eager, one sync per round).

Host-side bookkeeping per slot (prompt length, tokens emitted, budget) is an upper bound of the device state;
it sizes the KV columns each round attends to without reading the device.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator

import torch

from ..checks import check_int
from ..graphs import kv_segments, run_cpp, run_python
from ..models.engine import first_rows, graph_safe, supports
from ..ops._backend import pick_backend
from ..sampling import SamplingParams
from ..schemes import uses_base, uses_value
from .buffers import DecodeBuffers
from .continuous import ContinuousBatch
from .cross_vocab import Retokenizer
from .cross_vocab_feed import CrossVocabFeed
from .graph_cache import GraphCache, capture_step
from .inputs import pack_prompts
from .model_set import ModelSet
from .options import GenerationOptions
from .slot_request import SlotRequest, check_slot_request
from .slot_table import SlotTable
from .step import StepConfig, decode_step, emit, into_slots, prefill_logits, sample
from .stops import StopStringScanner, cut_at_stop_strings, nonfinite_error


class DecodeLoop(ContinuousBatch):
    """A batch of ``slots`` rows with ``capacity`` KV columns and up to ``out_cols`` new tokens per row.

    continuous: requests come and go between rounds (:meth:`admit`, :meth:`step`, :meth:`retire`); else one batch
    starts together (:meth:`start`) and is iterated. requests: how many of the slots take requests (default: all;
    the rest pad a graph's batch bucket), each of up to ``max_seq_len`` tokens, prompt and new (default:
    ``capacity``).

    graph_cache: graphs and persistent buffers (None, or a cache whose settings say no graphs: eager);
    retokenizer: the base's re-tokenizer across vocabularies; stops: the stop-string scanner. per_request (a
    continuous batch): every request brings its own sampling values to :meth:`admit` (``options`` give the
    defaults); each step then applies every warper and penalty with each row's values (a row at the neutral
    values is unchanged, a row at temperature 0 is greedy), and a request with a ``seed`` draws from its own
    counter-based stream. top_logprobs: the most tokens a request may ask the top alternatives of (each step then
    records, for the rows that ask, that many most likely tokens and their log-probabilities).
    """

    def __init__(
        self,
        models: ModelSet,
        options: GenerationOptions,
        *,
        slots: int,
        capacity: int,
        continuous: bool = False,
        requests: int | None = None,
        max_seq_len: int | None = None,
        out_cols: int,
        sync_every: int,
        graph_cache: GraphCache | None = None,
        stops: StopStringScanner | None = None,
        retokenizer: Retokenizer | None = None,
        per_request: bool = False,
        top_logprobs: int = 0,
        components: int = 0,
    ):
        if per_request and not continuous:
            raise ValueError("per_request sampling needs a continuous batch")
        check_int(top_logprobs, "top_logprobs", 0)
        if top_logprobs and not continuous:
            raise ValueError("top_logprobs needs a continuous batch (FastIVLDecoder.open_batch)")
        check_int(components, "components", 0, 64)
        if components and not continuous:
            raise ValueError("components= is a continuous batch's bound (generate() takes return_components)")
        if continuous and (any(options.record) or options.max_length is not None):
            raise ValueError(
                "output_scores, output_logits and max_length are generate() options; a continuous batch takes "
                "max_new_tokens per request and returns logprobs"
            )
        self.models, self.opts, self.sync_every = models, options, sync_every
        self.request_sampling = options.sampling  # what admit() gives a request that brings no values
        self.capacity, self.stops, self.retok = capacity, stops, retokenizer
        dev = models.device
        self.backend = pick_backend(models.sample_backend, dev)
        kind = graph_cache.settings.kind if graph_cache is not None else None
        self.graph_kind, self.cache = kind, graph_cache if kind else None
        if kind:
            bucket = ("continuous", slots) if continuous else slots  # a persistent batch owns its buffers and graphs
            self.bucket = bucket
            self.bufs = graph_cache.buffers(bucket, slots, out_cols, models.sampled_vocab, self.backend)
        else:
            self.bucket = None
            self.bufs = DecodeBuffers(slots, out_cols, models.sampled_vocab, dev, self.backend)
        self.rows = slots
        self.requests = slots if requests is None else requests
        self.max_seq_len = capacity if max_seq_len is None else max_seq_len
        sp = options.sampling
        if per_request:  # the step's shape: every warper and penalty on, the values read from the buffers
            sp = self.bufs.row_sampling()
        self.per_request = per_request
        self.cfg = StepConfig(
            sp,
            options.return_logprobs,
            self.backend,
            kind is not None or per_request,
            len(options.eos_token_id),
            continuous=continuous,
            row_alpha=per_request and self.backend == "torch",
            row_seeds=per_request,
            top_logprobs=top_logprobs,
            min_new_tokens=options.min_new_tokens,
            record_scores=options.record[0],
            record_logits=options.record[1],
            components=options.return_components or components,
        )
        # eager rounds skip what no busy row asks for: top alternatives, per-row seeds (Philox over [B, V]), the
        # components (a generate() batch asks for them for every row or none)
        self._eager_cfgs = {
            (top, seeds, comps): dataclasses.replace(
                self.cfg,
                top_logprobs=self.cfg.top_logprobs if top else 0,
                row_seeds=self.cfg.row_seeds and seeds,
                components=self.cfg.components if comps or not continuous else 0,
            )
            for top in (False, True)
            for seeds in (False, True)
            for comps in (False, True)
        }
        self._lean = models.all_support("graphs")  # kv_len= is honoured
        seed = options.seed or 0
        if options.seed is None and not sp.greedy:
            seed = int(torch.randint(0, 2**62, (1,)))  # fresh entropy from the global RNG (greedy runs use none)
        with torch.inference_mode():  # the buffers may be inference tensors (made under a caller's inference mode)
            self.bufs.reset(options.pad_token_id, int(seed))
            self.eos = self.bufs.eos_buffer(options.eos_token_id)
            if top_logprobs:
                self.bufs.ensure_top(top_logprobs)
            self.bufs.ensure_records(*options.record)
            if self.cfg.components:
                if not (uses_base(models.scheme) and uses_value(models.scheme)):
                    raise ValueError(
                        f"return_components needs both models (scheme {models.scheme!r} runs one): it compares the "
                        "base alone with the combination"
                    )
                self.bufs.ensure_components(self.cfg.components)
        self.table = SlotTable(slots)  # the host's record of the busy slots (no device read)
        self.steps = 0  # decode rounds run (the generate() view: every row starts at round 0)
        self.prefill_s = 0.0
        self.captures = 0
        self._checked_round = 0
        self.prompt: torch.Tensor | None = None  # the batch given to start() [b, T]
        self._allocate()
        self._cache_state = self._cache_token() if models.all_support("slots") else None

    # what a server asks of a batch (SpeculativeSlots answers the same)
    per_row_alpha = property(lambda self: self.cfg.row_alpha)
    per_row_seeds = property(lambda self: self.cfg.row_seeds)
    max_top_logprobs = property(lambda self: self.cfg.top_logprobs)
    max_components = property(lambda self: self.cfg.components if self.cfg.continuous else 0)
    max_tokens_per_step = 1

    # ------------------------------------------------------------------ admission
    def _allocate(self) -> None:
        m = self.models
        if self.retok is None:
            for e in m.engines:
                e.allocate(self.rows, self.capacity)
                if supports(e, "slots"):  # free slots sit at position 0 (rows of an earlier run may sit anywhere)
                    e.free_rows()
            return
        self.feed = CrossVocabFeed(m, self.retok, self.rows)
        self.feed.allocate(self.capacity, self.max_seq_len, self.bufs.cols, self.cfg.continuous)

    def start(self, prompt: torch.Tensor, mask: torch.Tensor) -> None:
        """Admit a batch of left-padded prompts [b, T] into slots 0..b-1 (one prefill) and emit their first tokens."""
        b = prompt.shape[0]
        self.prompt = prompt
        self._admit(list(range(b)), prompt, mask, self.opts.max_new_tokens)

    def admit(
        self,
        prompt_ids: list[int],
        max_new_tokens: int | None = None,
        sampling: SamplingParams | None = None,
        alpha: float | None = None,
        *,
        seed: int | None = None,
        top_logprobs: int = 0,
    ) -> int:
        """Prefill one request into a free slot between rounds (the other rows are untouched) and emit its first
        token; -> the slot. Its greedy tokens are the same as when it runs alone. ``sampling``, ``alpha``, ``seed``:
        this request's values (a batch opened with ``per_request=True`` only; a per-request alpha needs the torch
        sampler: the fused kernel takes one alpha per batch); ``top_logprobs``: see :class:`SlotRequest`."""
        req = SlotRequest(prompt_ids, max_new_tokens, sampling, alpha, seed, top_logprobs)
        return self.admit_many([req])[0]

    def admit_many(self, requests: list) -> list[int]:
        """Admit several requests (:class:`SlotRequest`, or tuples ``(prompt_ids, max_new_tokens, sampling,
        alpha)``) with one prefill of them all (left-padded); -> their slots. Each is checked as :meth:`admit`
        checks it (ValueError naming the request) before anything is admitted."""
        if not self.cfg.continuous:
            raise ValueError("admit() needs a continuous batch (FastIVLDecoder.open_batch)")
        if not self.models.all_support("slots"):
            raise ValueError("admitting requests into a running batch needs the lean engine")
        self._check_cache()
        free = self.table.free(self.requests)
        if len(requests) > len(free):
            raise ValueError(
                f"{len(requests)} request(s) for {len(free)} free slot(s) of {self.requests}: the other slots are "
                "taken; retire some first"
            )
        checked = [self.check_request(i, r) for i, r in enumerate(requests)]
        if not checked:
            return []
        if self.retok is not None:  # how the base reads each prompt (refused before anything is admitted)
            where = (f"request {i}: " if i else "" for i in range(len(checked)))
            contexts = [self.retok.context(list(c.prompt_ids), c.text, w) for c, w in zip(checked, where, strict=True)]
        ids, mask = pack_prompts(
            [list(c.prompt_ids) for c in checked], None, self.opts.pad_token_id, self.models.vocab_size
        )
        dev = self.models.device
        slots = free[: len(checked)]
        try:  # all or nothing: a failure here leaves the batch as it was, the other rows untouched
            if self.retok is not None:
                for s_, c, (text, ctx) in zip(slots, checked, contexts, strict=True):
                    self.retok.add(s_, list(c.prompt_ids), text, ctx)
            self._admit(slots, ids.to(dev), mask.to(dev), checked)
        except BaseException:
            self._undo_admit(slots)
            raise
        return slots

    def _undo_admit(self, slots: list[int]) -> None:
        """Free ``slots`` after a failed admission: the rows it reset are finished again (a step skips them), their
        bookkeeping is dropped, and the caches' state is this batch's own again (only its prefill touched them)."""
        with torch.inference_mode():
            self.bufs.retire(torch.tensor(slots, device=self.models.device))
        for s in slots:
            self.table.remove(s)
            if self.retok is not None:
                self.retok.remove(s)
        if self.models.all_support("slots"):
            self._cache_state = self._cache_token()

    def check_request(self, i: int, request) -> SlotRequest:
        """``request`` (a :class:`SlotRequest` or its tuple) -> the SlotRequest with the defaults filled in;
        ValueError naming request ``i``."""
        return check_slot_request(
            request,
            i,
            per_request=self.per_request,
            alpha=self.models.alpha,
            alpha_why=None
            if self.cfg.row_alpha
            else "a per-request alpha needs the torch sampler (sample_backend='torch'); the fused kernel takes one "
            "alpha per batch",
            seed_why=None,
            max_top_logprobs=self.cfg.top_logprobs,
            top_why="by this batch (open it with top_logprobs=K)",
            max_components=self.max_components,
            default_budget=self.opts.max_new_tokens,
            max_budget=self.bufs.cols,
            max_seq_len=self.max_seq_len,
            default_sampling=self.request_sampling,
            vocab_size=self.models.vocab_size,
        )

    def retire(self, slot: int) -> None:
        """Free ``slot`` (finished or not) between rounds; the other rows are untouched."""
        self.table.require(slot)
        self.bufs.retire(torch.tensor([slot], device=self.models.device))
        self.table.remove(slot)
        if self.retok is not None:
            self.retok.remove(slot)

    def _admit(self, slots: list[int], prompt, mask, requests: list[SlotRequest] | int) -> None:
        """Prefill left-padded prompts [n, T] into ``slots`` and emit their first tokens. ``requests``: one checked
        SlotRequest per row (admit_many), or one budget for every row with the batch's values (start())."""
        m, bufs = self.models, self.bufs
        n = len(slots)
        whole = n == self.rows
        rows_t = torch.tensor(slots, dtype=torch.int64, device=m.device)

        listed = isinstance(requests, list)
        budgets = [r.max_new_tokens for r in requests] if listed else [requests] * n
        for i, (length, budget) in enumerate(zip(mask.sum(1).tolist(), budgets, strict=True)):
            r = requests[i] if listed else None
            top, seeded, comps = (r.top_logprobs, r.seed is not None, r.components) if listed else (0, False, 0)
            self.table.add(slots[i], int(length), budget, top_logprobs=top, seeded=seeded, components=comps)
        with torch.inference_mode(), self.on_device():
            record = self.cfg.sampling.penalties_on  # the step applies penalties: every row needs its prompt
            if not listed:
                bufs.admit(rows_t, requests, self.request_sampling, prompt, mask, record_prompt=record, alpha=m.alpha)
            else:
                for i, r in enumerate(requests):
                    row = slice(i, i + 1)
                    bufs.admit(
                        rows_t[row],
                        r.max_new_tokens,
                        r.sampling,
                        prompt[row],
                        mask[row],
                        record_prompt=record,
                        alpha=r.alpha,
                        seed=r.seed,
                    )
            t0 = time.perf_counter()
            if self.retok is not None:
                zb, zv, grew, pushed = self.feed.prefill(prompt, mask, rows_t if self.cfg.continuous else None)
                if grew:  # our own growth, not another run taking the caches
                    self._cache_state = self._cache_token()
            else:
                zb, zv = prefill_logits(m, prompt, mask, rows=None if whole else rows_t)
                pushed = False
            self.prefill_s += time.perf_counter() - t0
            live = None
            if not whole:  # the new rows' logits in their slots; the other rows do not emit
                zb, zv = into_slots(zb, rows_t, self.rows), into_slots(zv, rows_t, self.rows)
                live = torch.zeros(self.rows, dtype=torch.bool, device=m.device).index_fill_(0, rows_t, True)
            cfg = self._round_cfg()
            emit(bufs, cfg, self.eos, *sample(m, bufs, cfg, zb, zv, pushed), live=live)
        if self.models.all_support("slots"):
            self._cache_state = self._cache_token()
        if self.steps == 0:
            self.steps = 1

    # ------------------------------------------------------------------ rounds
    def kv_need(self, ahead: int = 0) -> int:
        """KV columns the round ``ahead`` rounds from now attends to: every slot's position + 1 (a finished row
        stays at its last position, so its budget bounds it)."""
        if not self.cfg.continuous:  # one batch started together: every row has emitted self.steps tokens
            return self.table.longest_prompt() + min(self.steps + ahead, self.opts.max_new_tokens)
        return self.table.kv_need(ahead)

    def _emitted(self, r: int) -> int:
        """Tokens slot ``r`` has emitted at most (the host mirror)."""
        return self.table.emitted[r] if self.cfg.continuous else min(self.steps, self.table.budget[r])

    def note_rounds(self, rounds: int) -> None:
        """Account ``rounds`` decode rounds run (the host mirror; no device read)."""
        self.steps += rounds
        if self.cfg.continuous:
            self.table.note_rounds(rounds)

    def _round_cfg(self) -> StepConfig:
        """The step's config for an eager round: top alternatives and per-row seeds only while some busy row asks
        for them (graph replays always run the full config)."""
        t = self.table
        return self._eager_cfgs[(bool(t.top_logprobs), bool(t.seeded), bool(t.components))]

    def _eager_round(self) -> None:
        m, bufs = self.models, self.bufs
        if self.retok is not None:
            zb, zv, grew, pushed = self.feed.step(bufs.ids, bufs.finished, self.cfg.continuous)
            if grew and self._cache_state is not None:  # our own growth, not another run taking the caches
                self._cache_state = self._cache_token()
            cfg = self._round_cfg()
            emit(bufs, cfg, self.eos, *sample(m, bufs, cfg, zb, zv, pushed))
        else:
            kv = self.kv_need() if self._lean else None
            hi = self.table.rows_in_use() if self.cfg.continuous and len(self.table) else self.rows
            if hi < self.rows and self._cache_state is not None:  # free slots above every busy one: skip them
                with first_rows(m.engines, hi, self.rows):
                    decode_step(m, bufs.head(hi), self._round_cfg(), self.eos, kv)
            else:
                decode_step(m, bufs, self._round_cfg(), self.eos, kv)
        self.note_rounds(1)

    def step(self) -> bool:
        """One decode round for every live slot (eager, or one graph replay), then a host check; -> True when every
        slot has finished."""
        if not self.cfg.continuous:
            raise ValueError("step() needs a continuous batch (FastIVLDecoder.open_batch); iterate this loop instead")
        if not len(self.table):
            raise ValueError("no request in the batch: admit one first")
        self._check_cache()
        with torch.inference_mode(), self.on_device():
            if self.graph_kind is None:
                self._eager_round()
            else:
                self._replay(1)
            return self.check()

    def _check_cache(self) -> None:
        """The engines' KV caches still hold this batch (another generation on the same models would take them)."""
        if self._cache_state is not None and self._cache_token() != self._cache_state:
            raise RuntimeError(
                "the models' KV caches were taken by another generation (generate() on the same decoder while this "
                "batch is open); a batch owns the caches until it is dropped"
            )

    def _cache_token(self) -> list[tuple]:
        return [e.cache_token() for e in self.models.engines]

    # ------------------------------------------------------------------ generate / stream
    def __iter__(self) -> Iterator[torch.Tensor]:
        """After :meth:`start`: yield each round's ids [b] of the started rows until every row stopped."""
        b = len(self.table)
        n = self.opts.max_new_tokens
        with torch.inference_mode():  # entered per chunk: never held across a yield (the caller's code)
            done = (self.steps == n or self.steps % self.sync_every == 0) and self.check()
            ready = [self.bufs.out[:b, 0].clone()]
        yield from ready
        while not done and self.steps < n:
            first = self.steps
            with torch.inference_mode(), self.on_device():
                if self.graph_kind is None:
                    self._eager_round()
                    check = self.steps == n or self.steps % self.sync_every == 0
                else:
                    self._replay(self._chunk())
                    check = True
                if check:
                    done = self.check()  # host sync: the batched stop check
                    if done:  # every row stopped: drop the rounds run after the last one did
                        self.steps = int(self.bufs.stop_step[:b].max()) + 1  # host sync
                ready = [self.bufs.out[:b, s].clone() for s in range(first, self.steps)]
            yield from ready

    def finish_reasons(self, b: int) -> list[str]:
        """Why each of the ``b`` started rows ended: "eos" (an EOS id, its last token), "stop" (a stop string),
        "length" (max_new_tokens). One host read."""
        bufs = self.bufs
        out, stop_step, finished = bufs.out[:b].tolist(), bufs.stop_step[:b].tolist(), bufs.finished[:b].tolist()
        eos = set(self.opts.eos_token_id)
        reasons = []
        for row, s, f in zip(out, stop_step, finished, strict=True):
            if f and row[s] in eos:
                reasons.append("eos")
            elif f and self.stops is not None and self.stops.first_stop(row, s, s + 1) == s:
                reasons.append("stop")  # (a finished row's other end is its budget: a bucket's rows track theirs)
            else:
                reasons.append("length")
        return reasons

    def num_new_tokens(self, b: int) -> torch.Tensor:
        """[b] new tokens per started row, EOS included."""
        bufs = self.bufs
        n = torch.where(bufs.finished[:b], bufs.stop_step[:b] + 1, bufs.steps[:b])
        return torch.clamp(n, max=self.steps)

    # ------------------------------------------------------------------ graphs
    def _chunk(self) -> int:
        """Rounds to replay before the next host check: every remaining one when only EOS / NaN / budgets can stop
        the run (the runner watches the device's done flag every ``k`` rounds), else ``k``."""
        remaining = max(self.table.budget[r] - self._emitted(r) for r in self.table.length)
        every = self.sync_every
        return min(every, remaining) if (self.stops is not None or every == 1) else remaining

    def _replay(self, rounds: int) -> None:
        s = self.cache.settings
        runner = run_cpp if s.runner == "cpp" else run_python
        for kv, count in kv_segments((self.kv_need(j) for j in range(rounds)), self.capacity, s.kv_block):
            if not graph_safe(self.models.engines, kv):  # longrope past its switch: eager rounds
                for _ in range(count):
                    self._eager_round()
                continue
            graphs = self.graphs(kv)
            ran = runner(graphs, count, self.bufs.done, self.bufs.host, self.sync_every)
            self.note_rounds(ran)
            if ran < count:  # the done flag was seen
                return

    def graphs(self, kv_len: int):
        """The step graphs of KV bucket ``kv_len`` for this loop's settings (captured on a miss)."""
        m, bufs, cfg, eos = self.models, self.bufs, self.cfg, self.eos
        s = self.cache.settings
        mode = s.mode if m.scheme == "residual" else "one_stream"
        key = cfg.graph_key(mode, kv_len, m.alpha)
        versions = tuple(e.cache_version for e in m.engines)
        mutable = (bufs.mutable() + [t for e in m.engines for t in e.step_state()], bufs.gen)

        def active():
            return ~bufs.finished if cfg.continuous else None

        def capture(pool):
            return capture_step(
                s.kind,
                mode,
                key,
                self.cache.streams() if s.kind == "cuda" else None,
                pool,
                step_fn=lambda side: decode_step(m, bufs, cfg, eos, kv_len, side),
                base_fn=lambda: m.base.decode(bufs.ids, kv_len=kv_len, active=active()),
                value_fn=lambda: m.value.decode(bufs.ids, kv_len=kv_len, active=active()),
                emit_fn=lambda zb, zv: emit(bufs, cfg, eos, *sample(m, bufs, cfg, zb, zv)),
            )

        graphs, new = self.cache.get(self.bucket, key, versions, capture, mutable)
        self.captures += int(new)
        return graphs

    # ------------------------------------------------------------------ host checks
    def check(self) -> bool:
        """Host-side stop check: NaN/inf, stop strings; True when every row has finished."""
        bufs = self.bufs
        if bool(bufs.bad.any()):  # host sync
            rows = [r for r in bufs.bad.nonzero().flatten().tolist() if r in self.table]
            if rows:  # retire() clears a slot's flag: a server drops the request and carries on
                raise nonfinite_error(rows, self._checked_round, self.steps)
        if self.stops is not None:
            self._check_stop_strings()
        self._checked_round = self.steps
        return bool(bufs.finished.all())  # host sync

    def _check_stop_strings(self) -> None:
        emitted = {r: self._emitted(r) for r in self.table.length}
        cut_at_stop_strings(self.bufs, self.stops, self.table.checked, emitted, self.opts.pad_token_id)


__all__ = ["DecodeLoop"]
