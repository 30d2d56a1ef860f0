"""How a request's sequences become its answer: collected whole (non-streaming, cancelled when the client
leaves) or interleaved as server-sent events; a failed sequence becomes the OpenAI error its status says."""

from __future__ import annotations

import asyncio
import json

from fastapi import Request

from .metrics import Metrics
from .protocol import APIError
from .sequence import Delta, Failed, Finished


def failure(ev: Failed) -> APIError:
    """A sequence's failure as the error its request answers with (the status the worker gave it)."""
    if ev.status == 400:
        return APIError(400, str(ev.error))
    if ev.status == 503:
        return APIError(503, str(ev.error), type_="server_error", code="shutting_down")
    if ev.status == 499:
        return APIError(499, str(ev.error), code="client_closed_request")
    return APIError(500, f"decoding failed: {ev.error}", type_="server_error")


async def events(seq):
    """The sequence's events until it ends (Failed raises its APIError)."""
    while True:
        ev = await seq.events.get()
        if isinstance(ev, Failed):
            raise failure(ev)
        yield ev
        if isinstance(ev, Finished):
            return


async def collect(seq) -> tuple[str, list[int], list[float], list, list, Finished]:
    """(text, token ids, logprobs, top alternatives, components, the Finished event) of one sequence, whole."""
    text, ids, lps, tops, comps, fin = [], [], [], [], [], None
    async for ev in events(seq):
        if isinstance(ev, Delta):
            text.append(ev.text)
            ids += ev.token_ids
            lps += ev.logprobs
            tops += ev.top
            comps += ev.components
        else:
            fin = ev
    return "".join(text), ids, lps, tops, comps, fin


async def watch_disconnect(request: Request, seqs) -> None:
    """Cancel ``seqs`` when the client of a non-streaming request goes away (polled: a closed connection shows
    only when asked)."""
    while not await request.is_disconnected():
        await asyncio.sleep(0.1)
    for s in seqs:
        s.cancel()


async def run_all(request: Request, seqs) -> list:
    """Every sequence collected (:func:`collect`), all cancelled when the client leaves or one fails."""
    watcher = asyncio.create_task(watch_disconnect(request, seqs))
    try:
        return await asyncio.gather(*(collect(s) for s in seqs))
    finally:
        watcher.cancel()
        for s in seqs:
            s.cancel()  # a no-op once finished; frees the slots of the others when one failed


def sse(payload) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def stream(metrics: Metrics, path: str, seqs, make_chunk, first_chunks, usage_of):
    """Interleave the sequences' deltas as chunks; cancel every sequence when the client goes away. Counted in
    /metrics when it ends: 200, the status of a choice that failed (its error sent as a chunk), or 499."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, seq):
        try:
            async for ev in events(seq):
                await queue.put((i, ev))
        except APIError as e:
            await queue.put((i, e))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(seqs)]
    status = "499"  # until the stream ends: a client gone before that closed it
    try:
        for c in first_chunks:
            yield sse(c)
        done, completion, failed = 0, 0, None
        while done < len(seqs):
            i, ev = await queue.get()
            if isinstance(ev, APIError):  # this choice failed (its error as a chunk); the others go on
                yield sse(ev.body())
                failed = failed or str(ev.status)
                done += 1
                continue
            if isinstance(ev, Delta) and not ev.text and not ev.token_ids:
                continue
            if isinstance(ev, Finished):
                done += 1
                completion += ev.completion_tokens
            yield sse(make_chunk(i, ev))
        if usage_of is not None:
            yield sse(usage_of(completion))
        yield "data: [DONE]\n\n"
        status = failed or "200"
    finally:
        metrics.requests.labels(path, status).inc()
        for s in seqs:
            s.cancel()
        for t in tasks:
            t.cancel()
