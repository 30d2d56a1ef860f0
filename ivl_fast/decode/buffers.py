"""DecodeBuffers: the one owner of the device tensors a decode step mutates (vLLM's persistent batch).

Rows are slots. A free slot is a finished row: the step still runs over it (static shapes) but it emits pad,
writes nowhere that matters and its KV position does not advance. Admitting a request resets its row in place;
retiring it marks the row finished. Everything is updated in place only, so a captured graph keeps seeing the
same tensors; graph runs borrow the persistent buffers of their batch bucket from the graph cache.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from ..ops.row_sampling import RowSampling
from ..sampling import SamplingParams


@dataclass(frozen=True)
class NewTokens:
    """What :meth:`DecodeBuffers.read_new` read of one row: its output count, then the new tokens (at most the
    window), their log-probabilities and, when asked, each one's top alternatives [(id, logprob), ...]."""

    emitted: int
    ids: list[int]
    logprobs: list[float]
    alternatives: list[list[tuple[int, float]]] | None = None
    # per token, when asked: [base, value, combined], each [(id, value), ...] most likely first (:mod:`.components`)
    components: list[list[list[tuple[int, float]]]] | None = None


class DecodeBuffers:
    """rows: slots; cols: output columns per slot (the largest budget); vocab: the sampled vocabulary."""

    def __init__(self, rows: int, cols: int, vocab: int, device: torch.device, backend: str):
        i64 = dict(dtype=torch.int64, device=device)
        self.rows, self.cols, self.vocab, self.device, self.backend = rows, cols, vocab, device, backend
        self.ids = torch.zeros(rows, **i64)  # the token each row feeds to the next decode step
        # output tokens and logprobs per row; one extra column takes the writes of finished rows
        self.out = torch.zeros((rows, cols + 1), **i64)
        self.logprobs = torch.zeros((rows, cols + 1), dtype=torch.float32, device=device)
        self.finished = torch.ones(rows, dtype=torch.bool, device=device)  # free slots are finished
        self.steps = torch.zeros(rows, **i64)  # next output column of each row (its tokens so far)
        self.limit = torch.ones(rows, **i64)  # each row's max_new_tokens
        self.stop_step = torch.zeros(rows, **i64)  # index of each row's last token (valid once finished)
        self.bad = torch.zeros(rows, dtype=torch.bool, device=device)  # a non-finite logit was seen
        self.done = torch.zeros(1, dtype=torch.int32, device=device)  # every row finished, or a row non-finite
        # counter-based RNG state of the fused kernel: the offset advances on device after every step
        self.seed_t = torch.zeros(1, **i64)
        self.offset_t = torch.zeros(1, **i64)
        self.pad = torch.zeros((), **i64)
        self.eos: dict[int, torch.Tensor] = {}
        # per-row sampling values (graph runs read them, so new values need no recapture)
        f32 = dict(dtype=torch.float32, device=device)
        self.temperature = torch.ones(rows, **f32)
        self.top_k = torch.zeros(rows, **i64)
        self.top_p = torch.ones(rows, **f32)
        self.min_p = torch.zeros(rows, **f32)
        self.repetition_penalty = torch.ones(rows, **f32)
        self.presence_penalty = torch.zeros(rows, **f32)
        self.frequency_penalty = torch.zeros(rows, **f32)
        self.alpha = torch.ones(rows, **f32)  # the value network's weight per row (per-request batches)
        # a request's own random stream (per-request batches): Philox(row_seed; column, 0, steps) when seeded
        self.row_seed = torch.zeros(rows, **i64)
        self.seeded = torch.zeros(rows, dtype=torch.bool, device=device)
        # the K most likely tokens per row and output column, with their logprobs (ensure_top allocates them)
        self.top_ids: torch.Tensor | None = None  # [rows, cols + 1, K] int64
        self.top_logprobs: torch.Tensor | None = None  # [rows, cols + 1, K] fp32
        # each step's processed scores and combined logits (transformers' output_scores / output_logits)
        self.scores: torch.Tensor | None = None  # [rows, cols + 1, vocab] fp32
        self.raw_logits: torch.Tensor | None = None  # [rows, cols + 1, vocab] fp32
        # each step's top-K of the base, of the value network's delta and of the combination (ensure_components)
        self.comp_ids: torch.Tensor | None = None  # [rows, cols + 1, 3, K] int64
        self.comp_vals: torch.Tensor | None = None  # [rows, cols + 1, 3, K] fp32
        self.prompt_mask: torch.Tensor | None = None  # [rows, vocab] bool: ids in each row's prompt (penalties)
        self.output_counts: torch.Tensor | None = None  # [rows, vocab] int32: each row's generated ids
        self.gen = torch.Generator(device=device)  # the torch sampler's RNG (persistent: graphs replay with it)
        # the fused kernel's fp32 workspace, allocated once (static for graph capture)
        self.work = torch.empty(rows, vocab, **f32) if backend == "triton" else None
        self._host = None
        self.pad_id = 0
        self._views: dict[tuple, tuple] = {}  # sampling_view's: (per_row, row_seeds) -> (its SamplingParams, view)

    ROW_TENSORS = (
        "ids",
        "out",
        "logprobs",
        "finished",
        "steps",
        "limit",
        "stop_step",
        "bad",
        "temperature",
        "top_k",
        "top_p",
        "min_p",
        "repetition_penalty",
        "presence_penalty",
        "frequency_penalty",
        "alpha",
        "row_seed",
        "seeded",
        "top_ids",
        "top_logprobs",
        "scores",
        "raw_logits",
        "comp_ids",
        "comp_vals",
        "prompt_mask",
        "output_counts",
        "work",
    )  # [rows, ...]; the rest (done, the RNG state, pad, eos ids) is shared by every row

    def head(self, n: int) -> DecodeBuffers:
        """A view of the first ``n`` rows (every write goes to these buffers): an eager step of a continuous batch
        whose busy slots are all below ``n`` runs on it, so free slots cost nothing."""
        view = copy.copy(self)
        for name in self.ROW_TENSORS:
            t = getattr(self, name)
            if t is not None:
                setattr(view, name, t[:n])
        view.rows = n
        view._views = {}  # its sampling views read its own rows
        return view

    def sampling_view(self, sampling: SamplingParams, per_row: bool, row_seeds: bool) -> RowSampling:
        """The fused sampler's input for a step of ``sampling`` (its static flags: what no row uses), built once per
        step configuration and kept: its tensors are these buffers, which later steps and admissions update in
        place. ``per_row``: the warpers' and penalties' values are read from the per-row buffers (graph runs, per-
        request batches), else they are ``sampling``'s scalars; ``row_seeds``: rows may bring their own stream."""
        key = (per_row, row_seeds)  # one view kept per key: another ``sampling`` replaces it (no growth)
        kept = self._views.get(key)
        if kept is not None and kept[0] is sampling:
            return kept[1]
        sp = sampling
        params = sp
        if per_row:
            pen = dict(repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty)
            pen.update(frequency_penalty=self.frequency_penalty)
            if not sp.penalties_on:
                pen = {}
            if sp.greedy:  # values unused (Python scalars keep the per-row tensors out of a greedy capture)
                params = SamplingParams.trusted(False, 1.0, 0, 1.0, 0.0, **pen)
            else:
                params = SamplingParams.trusted(
                    sp.do_sample,
                    self.temperature,
                    self.top_k if sp.top_k_on else 0,
                    self.top_p if sp.top_p_on else 1.0,
                    self.min_p if sp.min_p_on else 0.0,
                    **pen,
                )
        view = RowSampling(
            params,
            seed=self.seed_t,
            offset=self.offset_t,
            generator=None if sp.greedy else self.gen,
            prompt_mask=self.prompt_mask if sp.penalties_on else None,
            output_counts=self.output_counts if sp.penalties_on else None,
            row_seed=self.row_seed if row_seeds else None,
            row_step=self.steps if row_seeds else None,
            seeded=self.seeded if row_seeds else None,
        )
        self._views[key] = (sampling, view)
        return view

    def row_sampling(self) -> SamplingParams:
        """Every warper and penalty on, the values read from these per-row buffers (a greedy row: temperature 0):
        the sampling of a per-request batch, whose step reads each row's own values."""
        return SamplingParams.trusted(
            True,
            self.temperature,
            self.top_k,
            self.top_p,
            self.min_p,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
        )

    def fits(self, rows: int, cols: int, backend: str) -> bool:
        return self.rows == rows and self.cols >= cols and (self.work is None) == (backend != "triton")

    @property
    def host(self) -> torch.Tensor:
        """The runner's two flag slots in host memory (pinned on CUDA: the target of asynchronous copies)."""
        if self._host is None:
            self._host = torch.zeros(2, dtype=torch.int32, pin_memory=self.device.type == "cuda")
        return self._host

    def eos_buffer(self, eos) -> torch.Tensor:
        buf = self.eos.get(len(eos))
        if buf is None:
            buf = self.eos[len(eos)] = torch.zeros(len(eos), dtype=torch.int64, device=self.device)
        if eos:
            buf.copy_(torch.tensor(list(eos), dtype=torch.int64), non_blocking=True)
        return buf

    def ensure_top(self, k: int) -> None:
        """Room for ``k`` top alternatives per row and column (kept when already as large)."""
        if self.top_ids is None or self.top_ids.shape[2] < k:
            shape = (self.rows, self.cols + 1, k)
            self.top_ids = torch.zeros(shape, dtype=torch.int64, device=self.device)
            self.top_logprobs = torch.zeros(shape, dtype=torch.float32, device=self.device)

    def ensure_records(self, scores: bool, logits: bool) -> None:
        """Room for each step's scores and/or combined logits (a generate() run that returns them; fp32)."""
        shape = (self.rows, self.cols + 1, self.vocab)
        for name, on in (("scores", scores), ("raw_logits", logits)):
            if on and getattr(self, name) is None:
                setattr(self, name, torch.zeros(shape, dtype=torch.float32, device=self.device))

    def ensure_components(self, k: int) -> None:
        """Room for ``k`` entries of each component per row and column (kept when already as large)."""
        if self.comp_ids is None or self.comp_ids.shape[3] < k:
            shape = (self.rows, self.cols + 1, 3, k)
            self.comp_ids = torch.zeros(shape, dtype=torch.int64, device=self.device)
            self.comp_vals = torch.zeros(shape, dtype=torch.float32, device=self.device)

    def ensure_penalty_buffers(self) -> None:
        if self.prompt_mask is None:
            self._views = {}  # views built before read no penalty state
            self.prompt_mask = torch.zeros((self.rows, self.vocab), dtype=torch.bool, device=self.device)
            self.output_counts = torch.zeros((self.rows, self.vocab), dtype=torch.int32, device=self.device)

    @torch.inference_mode()
    def reset(self, pad_id: int, seed: int) -> None:
        """Every slot free; a new RNG stream."""
        self.finished.fill_(True)
        self.steps.zero_()
        self.stop_step.zero_()
        self.limit.fill_(1)
        self.bad.zero_()
        self.done.zero_()
        self.offset_t.zero_()
        self.pad_id = pad_id
        self.pad.fill_(pad_id)
        self.ids.fill_(pad_id)
        self.out.fill_(pad_id)
        self.logprobs.zero_()
        self.seed_t.fill_(seed)
        self.gen.manual_seed(seed)

    @torch.inference_mode()
    def admit(
        self,
        rows: torch.Tensor,
        budget: int,
        sampling: SamplingParams,
        prompt=None,
        mask=None,
        record_prompt=None,
        alpha: float = 1.0,
        seed: int | None = None,
    ) -> None:
        """Reset the slots ``rows`` [n] (int64, on device) for new requests of ``budget`` new tokens each; with
        penalties on (``record_prompt``, default: ``sampling``'s), record their prompts ``prompt`` [n, T] (``mask``
        [n, T] marks the real tokens). ``seed``: the rows' own random stream (None: the batch's)."""
        self.out.index_fill_(0, rows, self.pad_id)
        self.logprobs.index_fill_(0, rows, 0.0)
        for buf, value in (
            (self.finished, False),
            (self.steps, 0),
            (self.stop_step, 0),
            (self.limit, budget),
            (self.bad, False),
            (self.temperature, 0.0 if sampling.greedy else sampling.temperature),  # a greedy row reads t = 0
            (self.top_k, sampling.top_k),
            (self.top_p, sampling.top_p),
            (self.min_p, sampling.min_p),
            (self.repetition_penalty, sampling.repetition_penalty),
            (self.presence_penalty, sampling.presence_penalty),
            (self.frequency_penalty, sampling.frequency_penalty),
            (self.alpha, alpha),
            (self.row_seed, 0 if seed is None else seed),
            (self.seeded, seed is not None),
        ):
            if isinstance(value, torch.Tensor):
                buf.index_copy_(0, rows, value.reshape(-1).to(buf))
            else:
                buf.index_fill_(0, rows, value)
        self.done.zero_()
        if sampling.penalties_on if record_prompt is None else record_prompt:
            self.ensure_penalty_buffers()
            self.output_counts.index_fill_(0, rows, 0)
            # padding goes to an extra column that is dropped: only real prompt ids are penalised
            # (and prompt ids past the sampled vocabulary: a value model with padded logits across vocabularies)
            seen = torch.zeros((rows.shape[0], self.vocab + 1), dtype=torch.bool, device=self.device)
            seen.scatter_(1, torch.where(mask & (prompt < self.vocab), prompt, self.vocab), True)
            self.prompt_mask.index_copy_(0, rows, seen[:, : self.vocab])

    @torch.inference_mode()
    def retire(self, rows: torch.Tensor) -> None:
        self.finished.index_fill_(0, rows, True)
        self.bad.index_fill_(0, rows, False)  # a non-finite request retired does not stop the others
        self.done.copy_(self.finished.all().to(torch.int32).reshape(1))

    # ------------------------------------------------------------------ reads (host syncs)
    def tokens(self, slot: int) -> list[int]:
        """The new tokens of row ``slot`` so far, up to and including its last (one host sync)."""
        n = int(self.stop_step[slot]) + 1 if bool(self.finished[slot]) else int(self.steps[slot])
        return self.out[slot, :n].tolist()

    def is_finished(self, slot: int) -> bool:
        return bool(self.finished[slot])

    def read_new(
        self, slots: list[int], seen: list[int], window: int, top_logprobs: int = 0, components: int = 0
    ) -> list[NewTokens]:
        """One device read: for each row of ``slots``, its output count and the (at most ``window``) tokens after
        the ``seen`` it has read, with their log-probabilities, each one's ``top_logprobs`` most likely
        alternatives and ``components`` entries of what the value network changed."""
        top = top_logprobs
        if not slots:
            return []
        dev = self.steps.device
        idx = torch.tensor(slots, device=dev)
        first = torch.tensor(seen, device=dev)
        cols = (first[:, None] + torch.arange(window, device=dev)[None]).clamp(max=self.out.shape[1] - 1)  # [n, w]
        parts = [self.steps[idx].double()[:, None], self.out[idx].gather(1, cols).double()]
        parts.append(self.logprobs[idx].gather(1, cols).double())
        if top:  # [n, w * top] ids, then their logprobs
            parts.append(self.top_ids[idx[:, None], cols, :top].flatten(1).double())
            parts.append(self.top_logprobs[idx[:, None], cols, :top].flatten(1).double())
        k = components
        if k:  # [n, w * 3 * k] ids, then their values
            parts.append(self.comp_ids[idx[:, None], cols, :, :k].flatten(1).double())
            parts.append(self.comp_vals[idx[:, None], cols, :, :k].flatten(1).double())
        read = torch.cat(parts, 1).tolist()  # the one host read (ids < 2^53 are exact as doubles)
        out = []
        for row, done in zip(read, seen, strict=True):
            emitted = int(row[0])
            n = max(0, min(emitted - done, window))
            ids = [int(x) for x in row[1 : 1 + n]]
            lps = row[1 + window : 1 + window + n]
            alts = None
            if top:
                at = 1 + 2 * window
                alts = [
                    [(int(row[at + t * top + i]), row[at + window * top + t * top + i]) for i in range(top)]
                    for t in range(n)
                ]
            comps = None
            if k:  # one token's entries: 3 sides of k, ids first, then (window * 3 * k later) their values
                at = 1 + 2 * window + 2 * window * top
                vals = at + window * 3 * k
                comps = [
                    [
                        [(int(row[at + (t * 3 + s) * k + i]), row[vals + (t * 3 + s) * k + i]) for i in range(k)]
                        for s in range(3)
                    ]
                    for t in range(n)
                ]
            out.append(NewTokens(emitted, ids, lps, alts, comps))
        return out

    def mutable(self) -> list[torch.Tensor]:
        """The tensors a step writes (snapshot before a graph's warm-up / emulated capture, restore after)."""
        out = [self.ids, self.out, self.logprobs, self.finished, self.steps, self.stop_step, self.bad, self.done]
        out += [self.offset_t]
        if self.output_counts is not None:
            out.append(self.output_counts)
        return out
