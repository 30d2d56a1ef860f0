"""SpeculativeSlots: a continuous batch decoded in speculative rounds (a server with a draft model).

The rows are slots, as in :class:`~ivl_fast.decode.loop.DecodeLoop`'s continuous batches: a request is prefilled
into a free slot between rounds (the base, the value network and the draft all read its prompt into that row;
its first token comes from plain decoding's sampler), then every round drafts ``k`` tokens per live row and the
base verifies them (:func:`~ivl_fast.decode.speculative.speculative_round`), so each row emits 1 to k + 1
tokens per round; finished rows are rewound by the round and retired slots go back to position 0. Greedy rows
emit exactly their tokens alone (the round's greedy acceptance is plain greedy decoding); sampled rows follow the
plain sampling law (exact speculative sampling) from the batch's random stream.

Per-request values: budgets, and with ``per_request=True`` every warper and penalty per row (greedy rows at
temperature 0). Not here (refused naming the field): a per-request alpha other than the decoder's, per-request
seeds with sampling, top alternatives; the round draws from one stream and combines with one alpha.

Eager rounds; the host reads the round's flags and every row's column count once per round (one sync).
"""

from __future__ import annotations

import time

import torch

from ..checks import check_int
from ..models.engine import first_rows
from ..ops._backend import pick_backend
from .buffers import DecodeBuffers
from .continuous import ContinuousBatch
from .inputs import pack_prompts
from .model_set import ModelSet
from .options import GenerationOptions
from .slot_request import SlotRequest, check_slot_request
from .slot_table import SlotTable
from .speculative import SpecConfig, SpecState, speculative_round
from .step import StepConfig, emit, into_slots, prefill_logits, sample
from .stops import nonfinite_error


class SpeculativeSlots(ContinuousBatch):
    """``slots`` requests of up to ``max_seq_len`` tokens each (prompt + new), drafted ``k`` at a time by
    ``draft`` (+ the value network) and verified by the base."""

    def __init__(
        self,
        models: ModelSet,
        draft,
        options: GenerationOptions,
        *,
        k: int,
        slots: int,
        max_seq_len: int,
        per_request: bool = False,
    ):
        if options.min_new_tokens or any(options.record) or options.max_length is not None or options.return_components:
            raise ValueError(
                "min_new_tokens, output_scores, output_logits, max_length and return_components are not supported by "
                "a speculative continuous batch"
            )
        self.models, self.draft, self.opts, self.k = models, draft, options, k
        self.rows = self.requests = slots
        self.max_seq_len = max_seq_len
        self.capacity = max_seq_len + k + 1  # a round reads up to k + 1 tokens past what a row keeps
        self.backend = pick_backend(models.sample_backend, models.device)
        cols = max_seq_len - 1 + k  # a round writes up to k + 1 columns past a row's last; the spare takes the rest
        self.bufs = DecodeBuffers(slots, cols, models.sampled_vocab, models.device, self.backend)
        self.request_sampling = options.sampling
        self.per_request = per_request
        sp = self.bufs.row_sampling() if per_request else options.sampling
        n_eos = len(options.eos_token_id)
        self.first_cfg = StepConfig(sp, options.return_logprobs, self.backend, per_request, n_eos, continuous=True)
        self.cfg = SpecConfig(k, sp, options.return_logprobs, n_eos)
        seed = options.seed or 0
        if options.seed is None and (per_request or not options.sampling.greedy):  # requests may sample
            seed = int(torch.randint(0, 2**62, (1,)))
        self.state = SpecState.new(slots, models.device)
        with torch.inference_mode():
            self.bufs.reset(options.pad_token_id, int(seed))
            self.eos = self.bufs.eos_buffer(options.eos_token_id)
            for e in self.engines:
                e.allocate(slots, self.capacity)
                e.free_rows()
        self.table = SlotTable(slots)  # the host's record of the busy slots (emitted: read after every round)
        self.rounds = 0
        self.prefill_s = 0.0

    # what it can do per row (ContinuousBatch): one alpha and one random stream for the batch, no top alternatives
    max_tokens_per_step = property(lambda self: self.k + 1)

    @property
    def engines(self) -> list:
        return [*self.models.engines, self.draft]

    # ------------------------------------------------------------------ admission
    def check_request(self, i: int, request) -> SlotRequest:
        """``request`` (a :class:`SlotRequest` or its tuple) with the defaults filled in; ValueError naming
        request ``i`` and the field a speculative batch cannot take."""
        return check_slot_request(
            request,
            i,
            per_request=self.per_request,
            alpha=self.models.alpha,
            alpha_why="speculative rounds combine with one alpha",
            seed_why="with a draft model (one random stream)",
            max_top_logprobs=0,
            top_why="with a draft model",
            default_budget=self.opts.max_new_tokens,
            max_budget=self.max_seq_len - 1,
            max_seq_len=self.max_seq_len,
            default_sampling=self.request_sampling,
            vocab_size=self.models.vocab_size,
        )

    def admit(self, prompt_ids, max_new_tokens=None, sampling=None, alpha=None) -> int:
        return self.admit_many([SlotRequest(prompt_ids, max_new_tokens, sampling, alpha)])[0]

    def admit_many(self, requests: list) -> list[int]:
        """Prefill several requests into free slots with one prefill per model; -> their slots (first tokens
        emitted)."""
        free = self.table.free()
        if len(requests) > len(free):
            raise ValueError(f"{len(requests)} request(s) for {len(free)} free slot(s) of {self.rows}")
        checked = [self.check_request(i, r) for i, r in enumerate(requests)]
        if not checked:
            return []
        m, dev = self.models, self.models.device
        prompt, mask = pack_prompts([list(c.prompt_ids) for c in checked], None, self.opts.pad_token_id, m.vocab_size)
        prompt, mask = prompt.to(dev), mask.to(dev)
        slots = free[: len(checked)]
        rows = torch.tensor(slots, dtype=torch.int64, device=dev)
        try:  # all or nothing: a failure leaves the batch as it was, the other rows untouched
            self._admit(slots, rows, prompt, mask, checked)
        except BaseException:
            with torch.inference_mode():
                self.bufs.retire(rows)
                for e in self.engines:
                    e.free_rows(rows)
            raise
        return slots

    def _admit(self, slots: list[int], rows: torch.Tensor, prompt, mask, checked: list[SlotRequest]) -> None:
        m, bufs, dev = self.models, self.bufs, self.models.device
        with torch.inference_mode(), self.on_device():
            for i, c in enumerate(checked):
                row = slice(i, i + 1)
                bufs.admit(
                    rows[row],
                    c.max_new_tokens,
                    c.sampling,
                    prompt[row],
                    mask[row],
                    record_prompt=self.cfg.sampling.penalties_on,
                )
            t0 = time.perf_counter()
            zb, zv = prefill_logits(m, prompt, mask, rows=rows)
            self.draft.prefill(prompt, mask, rows=rows)  # its logits are unused: a round starts by reading [p, y]
            lens = self.draft.context_lengths()
            lens.index_copy_(0, rows, mask.sum(1) - 1)  # p: the prompt's last token, read again with y
            self.draft.rewind(lens)
            self.state.prev.index_copy_(0, rows, prompt[:, -1])
            self.prefill_s += time.perf_counter() - t0
            zb, zv = into_slots(zb, rows, self.rows), into_slots(zv, rows, self.rows)
            live = torch.zeros(self.rows, dtype=torch.bool, device=dev).index_fill_(0, rows, True)
            emit(bufs, self.first_cfg, self.eos, *sample(m, bufs, self.first_cfg, zb, zv), live=live)
        for s, length, c in zip(slots, mask.sum(1).tolist(), checked, strict=True):
            self.table.add(s, int(length), c.max_new_tokens)

    def retire(self, slot: int) -> None:
        """Free ``slot`` between rounds: marked finished, every model's position back to 0."""
        self.table.require(slot)
        with torch.inference_mode():
            row = torch.tensor([slot], device=self.models.device)
            self.bufs.retire(row)
            for e in self.engines:
                e.free_rows(row)
        self.table.remove(slot)

    # ------------------------------------------------------------------ rounds
    def step(self) -> bool:
        """One speculative round for every live slot, then the round's host read; -> True when every slot has
        finished. NaN/inf in a row raises :class:`~ivl_fast.decode.stops.NonFiniteLogitsError` naming it."""
        if not len(self.table):
            raise ValueError("no request in the batch: admit one first")
        hi = self.table.rows_in_use()  # free slots above every busy one are skipped
        t = self.table
        need = max(t.length[r] + t.emitted[r] for r in t.length) + self.k + 1  # emitted: read after the last round
        with torch.inference_mode(), self.on_device():
            with first_rows(self.engines, hi, self.rows):
                state = SpecState(self.state.prev[:hi], self.state.drafted, self.state.accepted)
                bufs = self.bufs.head(hi)
                cfg = self.cfg
                if self.per_request:  # the round reads the per-row values of the rows it runs over
                    cfg = SpecConfig(self.k, bufs.row_sampling(), cfg.return_logprobs, cfg.n_eos)
                speculative_round(self.models, self.draft, bufs, cfg, self.eos, min(need, self.capacity), state)
            self.rounds += 1
            return self._sync()

    def _sync(self) -> bool:
        b = self.bufs
        slots = self.table.busy()
        idx = torch.tensor(slots, device=b.steps.device)
        read = torch.cat([b.steps[idx], b.bad[idx].to(torch.int64), b.finished[idx].to(torch.int64)]).tolist()
        n = len(slots)
        for s, e in zip(slots, read[:n], strict=True):
            self.table.emitted[s] = int(e)
        bad = [s for s, f in zip(slots, read[n : 2 * n], strict=True) if f]
        if bad:
            raise nonfinite_error(bad, self.rounds, self.rounds)
        return all(read[2 * n :])

    def timings(self) -> dict:
        drafted, accepted = int(self.state.drafted), int(self.state.accepted)
        return {
            "rounds": self.rounds,
            "drafted": drafted,
            "accepted": accepted,
            "acceptance_rate": accepted / drafted if drafted else 0.0,
        }


def check_slots(slots, max_seq_len, top: int) -> None:
    check_int(slots, "slots", 1)
    check_int(max_seq_len, "max_seq_len", 2, top)


__all__ = ["SpeculativeSlots", "check_slots"]
