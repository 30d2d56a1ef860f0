"""The server's engine: one continuous batch of the decode core (:meth:`FastIVLDecoder.open_batch` with
per-request values), stepped by one worker thread, fed by the HTTP handlers through a bounded queue.

Between steps the worker retires cancelled and finished sequences and admits waiting ones into free slots (one
prefill of all of them; the running rows wait for it), then runs one decode round for every live row. After
each round it reads every live row's new token in one device read and does per request, on the host, what the
device batch cannot do for each row differently: EOS / ``stop_token_ids`` (unless ``ignore_eos``), stop strings
(cut before the string, as OpenAI returns them) and the text deltas of streaming (held back while they could still
grow into a stop string or end in half a UTF-8 character). Events go to each sequence's asyncio queue with
``call_soon_threadsafe``; a request that fails (non-finite logits) fails alone.
"""

from __future__ import annotations

import asyncio
import queue
import sys
import threading
import time
import traceback

import torch

from ..decode.stops import NonFiniteLogitsError
from .sequence import (
    Cancelled,
    Delta,
    Failed,
    Finished,
    Outbox,
    QueueFull,
    Sequence,
    SequenceRequest,
    ShuttingDown,
    WorkerStopped,
    status_of,
)


class Scheduler:
    """Owns the decoder's continuous batch. ``max_batch_size`` slots of ``max_model_len`` tokens each (prompt +
    new); ``max_queue`` waiting sequences at most; ``max_prefill_tokens``: prompt tokens admitted between two steps
    at most (at least one request), so that a burst of arrivals stalls the running streams for a bounded time;
    ``max_num_batched_tokens`` (vLLM's name): tokens a step processes at most, one per running row plus the prompt
    tokens admitted before it (at least one request while a slot is free), so that every step costs about the
    same and the running streams' per-token latency stays even (prompts are not split: one longer than the budget
    is admitted alone); None: only ``max_prefill_tokens`` bounds admission; ``max_top_logprobs``: the most top
    alternatives a request may ask for; ``metrics``: a :class:`~ivl_fast.serve.metrics.Metrics`."""

    def __init__(
        self,
        decoder,
        *,
        max_batch_size: int,
        max_model_len: int,
        max_queue: int,
        max_prefill_tokens: int = 256,
        max_num_batched_tokens: int | None = None,
        max_top_logprobs: int = 20,
        max_components: int = 5,
        metrics=None,
    ):
        self.dec, self.tokenizer = decoder, decoder.tokenizer
        models = decoder.models
        if not models.all_support("slots"):  # refused here, not by every request's admission (which hung the server)
            arch = sorted({a for e in models.engines for a in getattr(e.config, "architectures", None) or ["?"]})
            raise ValueError(
                "serving needs every model on the lean engine (continuous batching admits requests into its slots); "
                f"{', '.join(arch)} runs on the transformers adapter here (ivl-fast generate and eval take it)"
            )
        self.vocab_size = models.vocab_size  # a prompt's token ids must be below it
        self.max_batch_size, self.max_model_len = max_batch_size, max_model_len
        self.max_prefill_tokens, self.max_num_batched_tokens = max_prefill_tokens, max_num_batched_tokens
        self._held: Sequence | None = None  # taken from the queue, over this step's prefill budget
        self.metrics = metrics
        self.eos = frozenset(decoder.options().eos_token_id)
        # the batch's own EOS check is off: EOS and stop tokens differ per request and are checked here. With a
        # draft model the batch decodes in speculative rounds (1 to k + 1 tokens per row and round; no top
        # alternatives, one alpha, no per-request seeds for sampled requests: the batch says so)
        self.batch = decoder.open_batch(
            max_batch_size,
            max_model_len,
            per_request=True,
            top_logprobs=0 if decoder.draft is not None else max_top_logprobs,
            components=0 if decoder.draft is not None or decoder.scheme in ("base", "value_only") else max_components,
            eos_token_id=[],
            return_logprobs=True,
        )
        self.max_top_logprobs = self.batch.max_top_logprobs
        self.max_components = getattr(self.batch, "max_components", 0)
        self.window = self.batch.max_tokens_per_step
        self._waiting: queue.Queue[Sequence] = queue.Queue(maxsize=max_queue)
        self._active: dict[int, Sequence] = {}  # slot -> sequence
        self._drain_deadline: float | None = None  # time.monotonic() after which what is left is ended (SIGTERM)
        # set by the worker as it ends (under the lock): from then on submit() refuses, so that no sequence is queued
        # after the worker's last look at the queue and never answered
        self._closed: ShuttingDown | None = None
        self._submit_lock = threading.Lock()
        self.failed: BaseException | None = None  # what stopped the worker, when it was not asked to stop
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ivl-fast-scheduler", daemon=True)
        self._out = Outbox()
        self.steps = 0

    # ------------------------------------------------------------------ the HTTP side
    def start(self) -> None:
        self._thread.start()

    def submit(self, request: SequenceRequest, loop: asyncio.AbstractEventLoop) -> Sequence:
        """Queue a sequence (QueueFull when the queue is full, ShuttingDown while draining); its events arrive on
        ``.events``."""
        if self._drain_deadline is not None:
            raise ShuttingDown("the server is shutting down and takes no new requests")
        seq = Sequence(request, loop)
        with self._submit_lock:
            if self._closed is not None:  # a new instance each time (one raised again would grow its traceback)
                raise type(self._closed)(str(self._closed))
            try:
                self._waiting.put_nowait(seq)
            except queue.Full:
                raise QueueFull(f"the server's queue of {self._waiting.maxsize} waiting requests is full") from None
        self._wake.set()
        self._report_load()
        return seq

    def begin_drain(self, timeout: float) -> None:
        """Take no new request; the running and waiting sequences go on for ``timeout`` more seconds at most, then
        end with a 503 (SIGTERM; a second call can only bring the deadline closer)."""
        deadline = time.monotonic() + max(0.0, timeout)
        if self._drain_deadline is None or deadline < self._drain_deadline:
            self._drain_deadline = deadline
        self._wake.set()

    @property
    def idle(self) -> bool:
        return not self._active and self._held is None and self._waiting.empty()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Drain (:meth:`begin_drain`), wait until nothing is left (``timeout`` seconds at most, then whatever is
        left was ended), and stop the worker."""
        self.begin_drain(timeout)
        while not self.idle and self._thread.is_alive() and time.monotonic() < self._drain_deadline + 5:
            time.sleep(0.02)
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    @property
    def running(self) -> int:
        return len(self._active)

    # ------------------------------------------------------------------ the worker
    def _run(self) -> None:
        """The worker. Every sequence taken off the queue ends with exactly one Finished or Failed event: a request
        that fails while it is checked or admitted fails alone (the batch and the other requests go on); a failure
        inside a round, which no one row can be blamed for, fails the rows of that round, and the server goes on.
        Should the worker itself break (anything outside those), every sequence it holds or that waits is answered
        with a 500, and the server refuses new requests (:class:`WorkerStopped`) instead of queueing them unheard."""
        try:
            with torch.inference_mode():
                while not self._stop.is_set():
                    try:
                        if self._drain_deadline is not None and time.monotonic() >= self._drain_deadline:
                            self._end_all(ShuttingDown("the server is shutting down (its drain deadline passed)"))
                        self._retire_cancelled()
                        self._admit_waiting()
                        if not self._active and self._held is None:
                            self._wake.wait(0.05)
                            self._wake.clear()
                            continue
                        self._round()
                    except Exception as e:  # noqa: BLE001  (a bug or a device error: fail what runs, answered, go on)
                        for slot in list(self._active):
                            self._fail(slot, e)
                    finally:
                        self._out.flush()
        except BaseException as e:  # the worker broke: answer everything (below), refuse from now on, say why
            self.failed = e
            why = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            self._close(WorkerStopped(f"the server's decoding worker stopped ({why}); restart the server"), 500)
            # a bug: its traceback on stderr (the thread ends here; the HTTP side answers 503 from now on)
            print("ivl-fast serve: the decoding worker stopped:", file=sys.stderr)
            traceback.print_exception(e, file=sys.stderr)
            return
        self._close(ShuttingDown("the server is shutting down"), 503)

    def _close(self, error: ShuttingDown, status: int) -> None:
        """The worker's last act: refuse new requests from now on with ``error``, then end every sequence still held
        or waiting with it and ``status``."""
        with self._submit_lock:  # a submit() either queued before this (answered below) or sees the refusal
            self._closed = error
        self._end_all(error, status)
        self._out.flush()

    def _end_all(self, error: BaseException, status: int = 503) -> None:
        """End every running, held and waiting sequence with ``error`` (``status``: 503 for a drain)."""
        for slot in list(self._active):
            self._fail(slot, error, status)
        if self._held is not None:
            self._out.post(self._held, Failed(error, status))
            self._held = None
        while not self._waiting.empty():
            self._out.post(self._waiting.get_nowait(), Failed(error, status))

    def _retire_cancelled(self) -> None:
        for slot, seq in list(self._active.items()):
            if seq.cancelled.is_set():
                self._fail(slot, Cancelled("the client went away"), 499)  # wakes a handler still waiting

    def _admit_waiting(self) -> None:
        """Admit waiting sequences into the free slots with one prefill of them all. A request the batch refuses,
        or whose admission fails, fails alone; every sequence taken here is admitted or answered."""
        take: list[Sequence] = []
        try:
            self._take(take)
            self._admit(take)
        except Exception as e:  # noqa: BLE001  (not expected: _admit answers each failure itself)
            for seq in take:
                if seq.slot is None:
                    self._out.post(seq, Failed(e, status_of(e)))
            raise
        self._report_load()

    def _admit(self, seqs: list[Sequence]) -> None:
        """Check each sequence alone, then admit those that pass with one prefill (:meth:`_admit_checked`)."""
        ok = []
        for seq in seqs:
            try:
                self.batch.check_request(0, seq.request.slot_request())
            except Exception as e:  # noqa: BLE001  (whatever the check raises, it is this request's alone)
                self._out.post(seq, Failed(e, status_of(e)))
            else:
                ok.append(seq)
        self._admit_checked(ok)

    def _admit_checked(self, seqs: list[Sequence]) -> None:
        """One prefill of ``seqs``. ``admit_many`` admits all or none, so when it fails the sequences are admitted
        one at a time and only the one whose admission fails is answered with the error."""
        if not seqs:
            return
        try:
            slots = self.batch.admit_many([s.request.slot_request() for s in seqs])
        except Exception as e:  # noqa: BLE001
            if len(seqs) == 1:
                self._out.post(seqs[0], Failed(e, status_of(e)))
                return
            for seq in seqs:
                self._admit_checked([seq])
            return
        for seq, slot in zip(seqs, slots, strict=True):
            seq.slot = slot
            self._active[slot] = seq
        if self.metrics is not None:
            self.metrics.admitted(sum(len(s.request.prompt_ids) for s in seqs))
        self._collect()  # their first tokens

    def _take(self, take: list[Sequence]) -> None:
        """Waiting sequences for the free slots, appended to ``take`` as they leave the queue (so that the caller
        answers them whatever fails), within this step's token budget (the one over it is held, first in line for
        the next step); a cancelled one is answered (499) and dropped."""
        room = self.max_batch_size - len(self._active)
        tokens = 0
        budget = self.max_prefill_tokens
        if self.max_num_batched_tokens is not None:  # the step's tokens: one per running row + the prompts admitted
            budget = min(budget, self.max_num_batched_tokens - len(self._active))
        while len(take) < room and (self._held is not None or not self._waiting.empty()):
            seq, self._held = (self._held, None) if self._held is not None else (self._waiting.get_nowait(), None)
            if seq.cancelled.is_set():
                self._out.post(seq, Failed(Cancelled("the client went away"), 499))
                continue
            take.append(seq)  # before anything else is read from it: taken is answered, whatever fails
            n = len(seq.request.prompt_ids)
            if len(take) > 1 and tokens + n > budget:
                self._held = take.pop()  # first in line for the next step
                break
            tokens += n

    def _round(self) -> None:
        try:
            self.batch.step()
        except NonFiniteLogitsError as e:
            for slot in getattr(e, "rows", []):
                if slot in self._active:
                    self._fail(slot, e)
        self.steps += 1
        self._collect()

    def _collect(self) -> None:
        """One device read (the batch's read_new): every live slot's new tokens (up to ``window`` per round) with
        their log-probabilities and, for the slots that ask, the top alternatives."""
        slots = sorted(self._active)
        if not slots:
            return
        k = max(self._active[s].request.top_logprobs for s in slots)
        kc = max(self._active[s].request.components for s in slots)
        seen = [len(self._active[s].tokens) for s in slots]
        extra = (kc,) if kc else ()  # a speculative batch records no components (it refuses them)
        read = self.batch.read_new(slots, seen, self.window, k, *extra)
        for slot, new in zip(slots, read, strict=True):
            seq = self._active[slot]
            kk, c = seq.request.top_logprobs, seq.request.components
            for t, (tok, logp) in enumerate(zip(new.ids, new.logprobs, strict=True)):
                comps = [side[:c] for side in new.components[t]] if c else None
                self._advance(slot, seq, tok, logp, new.alternatives[t][:kk] if kk else None, comps)
                if slot not in self._active:  # finished (EOS, a stop, the budget): the rest is past its end
                    break

    def _advance(self, slot: int, seq: Sequence, tok: int, logp: float, top=None, comps=None) -> None:
        r = seq.request
        t = time.perf_counter()
        if self.metrics is not None:
            self.metrics.token(t - seq.last_token_at if seq.last_token_at else None, t - seq.submitted)
        seq.last_token_at = t
        stop_tok = tok in r.stop_token_ids
        if stop_tok:  # the stop token itself is not part of the text
            self._finish(slot, seq, "stop", flush=True)
            return
        seq.tokens.append(tok)
        seq.logprobs.append(logp)
        if top is not None:
            seq.top.append(top)
        if comps is not None:
            seq.components.append(comps)
        text = self.tokenizer.decode(seq.tokens, skip_special_tokens=True)
        for s in r.stop:
            at = text.find(s, max(0, seq.sent_chars - len(s)))
            if at >= 0:
                self._send(seq, text[:at], final=True)
                self._finish(slot, seq, "stop")
                return
        if len(seq.tokens) >= r.max_tokens:
            self._send(seq, text, final=True)
            self._finish(slot, seq, "length")
            return
        self._send(seq, text, final=False)

    def _send(self, seq: Sequence, text: str, final: bool) -> None:
        """Send the text not sent yet, holding back (unless final) a tail that could still become a stop string
        or is half a character."""
        upto = len(text)
        if not final:
            if text.endswith("\ufffd"):
                upto = len(text.rstrip("\ufffd"))
            hold = max((len(s) - 1 for s in seq.request.stop), default=0)
            upto = max(seq.sent_chars, min(upto, len(text) - hold))
        new_tokens, new_lps = seq.tokens[seq.sent_tokens :], seq.logprobs[seq.sent_tokens :]
        new_top, new_comps = seq.top[seq.sent_tokens :], seq.components[seq.sent_tokens :]
        seq.sent_tokens = len(seq.tokens)
        self._out.post(seq, Delta(text[seq.sent_chars : upto], new_tokens, new_lps, new_top, new_comps))
        seq.sent_chars = max(seq.sent_chars, upto)

    def _finish(self, slot: int, seq: Sequence, reason: str, flush: bool = False) -> None:
        if flush:
            text = self.tokenizer.decode(seq.tokens, skip_special_tokens=True)
            self._send(seq, text, final=True)
        self._out.post(seq, Finished(reason, len(seq.tokens) + (1 if reason == "stop" and flush else 0)))
        if self.metrics is not None:
            self.metrics.finished(reason, time.perf_counter() - seq.submitted)
        self._release(slot)

    def _fail(self, slot: int, error: Exception, status: int = 500) -> None:
        seq = self._active.get(slot)
        if seq is not None:
            self._out.post(seq, Failed(error, status))
        self._release(slot)

    def _release(self, slot: int) -> None:
        self._active.pop(slot, None)
        try:
            self.batch.retire(slot)
        except ValueError:
            pass  # already free
        except Exception:  # noqa: BLE001  (a batch that cannot retire a row must not stop the others' answers)
            pass
        self._report_load()

    def _report_load(self) -> None:
        if self.metrics is not None:
            self.metrics.load(len(self._active), self._waiting.qsize(), self.max_batch_size)
