"""What a sequence of the server is and what it hears: the request (:class:`SequenceRequest`), the HTTP side's
handle with the worker's state of it (:class:`Sequence`), the events the worker posts to it (:class:`Delta`,
:class:`Finished`, :class:`Failed`), the errors that end it, and the :class:`Outbox` that hands one worker
iteration's events to each event loop at once (:mod:`.scheduler` is the worker that produces them).
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

from ..decode.slot_request import SlotRequest
from ..sampling import SamplingParams


class QueueFull(Exception):
    """The bounded queue of waiting requests is full (HTTP 503)."""


@dataclass
class SequenceRequest:
    """One sequence to decode (a request with ``n`` choices is ``n`` of them)."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams
    alpha: float | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: frozenset[int] = frozenset()
    logprobs: bool = False
    top_logprobs: int = 0  # the most likely alternatives per token, with their log-probabilities
    seed: int | None = None  # this sequence's own random stream (sampled requests)
    text: str | None = None  # the prompt's text (across vocabularies the base reads it with its own tokenizer)
    components: int = 0  # what the value network changed, per token (ivl_fast.decode.components): k of each side

    def slot_request(self) -> SlotRequest:
        return SlotRequest(
            self.prompt_ids,
            self.max_tokens,
            self.sampling,
            self.alpha,
            self.seed,
            self.top_logprobs,
            self.text,
            self.components,
        )


@dataclass
class Delta:
    """New output of a sequence: text (possibly empty while held back), token ids, their log-probabilities and,
    when asked for, the top alternatives of each ([(id, logprob), ...] per token, most likely first)."""

    text: str
    token_ids: list[int]
    logprobs: list[float]
    top: list[list[tuple[int, float]]] = field(default_factory=list)
    components: list = field(default_factory=list)  # per token: [base, value, combined] of (id, value) lists


@dataclass
class Finished:
    """The sequence ended: ``reason`` "stop" (EOS, a stop token or string) or "length"; ``completion_tokens``."""

    reason: str
    completion_tokens: int


@dataclass
class Failed:
    """The sequence ended without a result: ``error`` and the HTTP status it answers with (400: the batch refused
    the request; 499: its client went away; 503: the server is shutting down; 500: decoding failed)."""

    error: Exception
    status: int = 500


class Cancelled(Exception):
    """The sequence's client went away (its slot is freed; 499, nginx's "client closed request")."""


class ShuttingDown(Exception):
    """The server is draining (SIGTERM): no new request is taken, and what runs past the deadline is ended (503)."""


class WorkerStopped(ShuttingDown):
    """The worker thread itself broke (not a request or a round: those are answered and it goes on). Everything it
    held was answered with a 500; a later request is refused at once (503) and ``/health`` answers 503."""


def status_of(error: Exception) -> int:
    """A request the batch refuses is the client's fault (ValueError: 400); anything else is the server's (500)."""
    return 400 if isinstance(error, ValueError) else 500


@dataclass
class Sequence:
    """What the HTTP side holds: the request, its events and its cancel flag."""

    request: SequenceRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    # worker-side state
    slot: int | None = None
    tokens: list[int] = field(default_factory=list)  # generated ids (a stop token excluded)
    logprobs: list[float] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)
    components: list = field(default_factory=list)
    sent_chars: int = 0  # text characters sent so far
    sent_tokens: int = 0
    last_token_at: float = 0.0
    ended: bool = False  # its Finished or Failed event is posted

    def cancel(self) -> None:
        self.cancelled.set()

    def emit(self, event) -> None:
        """Hand an event to the HTTP side now (called from the worker thread; rounds batch theirs: Outbox)."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Outbox:
    """The events of one worker iteration, handed to each event loop with one ``call_soon_threadsafe``: a round
    of 64 streams wakes the HTTP side once instead of 64 times (fewer GIL hand-overs between the two threads)."""

    def __init__(self):
        self._by_loop: dict[asyncio.AbstractEventLoop, list] = {}

    def post(self, seq: Sequence, event) -> None:
        if isinstance(event, Finished | Failed):  # a sequence ends once: a second end (a fallback's) is dropped
            if seq.ended:
                return
            seq.ended = True
        self._by_loop.setdefault(seq.loop, []).append((seq.events, event))

    def flush(self) -> None:
        for loop, items in self._by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except Exception:  # noqa: BLE001  (that loop is closed, its clients gone: the other loops still get theirs)
                pass
        self._by_loop = {}


def _deliver(items) -> None:
    for q, event in items:
        q.put_nowait(event)
