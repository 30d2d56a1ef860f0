"""The OpenAI-compatible HTTP API over a :class:`~ivl_fast.serve.scheduler.Scheduler` (FastAPI).

Routes: ``GET /`` (the chat page, ``static/chat.html``), ``GET /v1/models``, ``POST /v1/completions``,
``POST /v1/chat/completions`` (non-streaming, or server-sent events in OpenAI's chunk format ending with
``data: [DONE]``), ``GET /health`` (503 once the decoding worker has stopped on an error), ``GET /metrics``
(Prometheus text).
Errors are OpenAI's JSON shape (:class:`~ivl_fast.serve.protocol.APIError`), including 413 for a body over
``max_body_bytes`` and 500 for anything unexpected. With an API key every ``/v1`` route needs ``Authorization:
Bearer KEY``. A client that disconnects, streaming or not, cancels its sequences (their slots are freed at the next
step). Work per request is bounded before it reaches the batch: the body's size, a prompt's length in characters
(checked against the context before tokenizing), and tokenization runs off the event loop (one thread of its own),
so a large prompt never stalls the other streams. ``/metrics`` counts a request when it ends, with its status.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from concurrent.futures import ThreadPoolExecutor
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from ..chat import as_messages, check_chat_template_kwargs, render_chat
from ..decode.slot_request import RequestError
from . import DEFAULT_MAX_BODY_BYTES
from .metrics import Metrics
from .protocol import (
    CHAT_FIELDS,
    COMPLETION_FIELDS,
    APIError,
    chat_logprobs,
    check_fields,
    choice_requests,
    completion_logprobs,
    new_id,
    now,
    refuse,
    sampling_request,
    top_logprobs_field,
    usage,
)
from .scheduler import Delta, Failed, Finished, QueueFull, Scheduler, ShuttingDown, WorkerStopped


def _split_prompts(prompt, vocab_size: int) -> list[str | list[int]]:
    """OpenAI's ``prompt``: a string, a list of strings, a list of token ids or a list of such lists -> the prompts,
    each a string or token ids in ``[0, vocab_size)`` (400 naming ``prompt`` otherwise)."""

    def is_ids(x):
        return isinstance(x, list) and x and all(isinstance(i, int) and not isinstance(i, bool) for i in x)

    if isinstance(prompt, str) or is_ids(prompt):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt or not all(isinstance(p, str) or is_ids(p) for p in prompt):
        raise APIError(400, "'prompt' must be a string, token ids, or a non-empty list of either", "prompt")
    if any(p == "" for p in prompt):
        raise APIError(400, "'prompt' holds an empty prompt", "prompt")
    for p in prompt:
        bad = None if isinstance(p, str) else next((i for i in p if not 0 <= i < vocab_size), None)
        if bad is not None:
            raise APIError(400, f"'prompt' holds token id {bad}, outside the vocabulary [0, {vocab_size})", "prompt")
    return prompt


def longest_token_chars(tok) -> int:
    """The most characters of text one token can stand for (its string's length bounds it: a byte-level or
    SentencePiece token string has at least one character per character of text it decodes to)."""
    return max(len(t) for t in tok.convert_ids_to_tokens(list(range(len(tok)))) if t is not None)


def build_app(
    scheduler: Scheduler,
    *,
    served_model_name: str,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> FastAPI:
    app = FastAPI(title="ivl-fast", docs_url=None, redoc_url=None)
    metrics: Metrics = scheduler.metrics
    tok = scheduler.tokenizer
    vocab_size = scheduler.vocab_size
    # a text longer than this many characters cannot fit the context whatever it tokenizes to: refused untokenized
    max_prompt_chars = scheduler.max_model_len * longest_token_chars(tok)
    # one thread tokenizes, in arrival order: the event loop (and so every stream) never waits for a long prompt,
    # and one tokenizer is never used by two requests at once
    tokenizing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ivl-fast-tokenize")

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        metrics.requests.labels(request.url.path, str(e.status)).inc()
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):  # a bug: still OpenAI's shape, and counted
        metrics.requests.labels(request.url.path, "500").inc()
        body = APIError(500, f"internal error: {type(e).__name__}: {e}", type_="server_error").body()
        return JSONResponse(body, status_code=500)

    async def tokenize(text: str, field: str, **kw) -> list[int]:
        """Token ids of ``text`` off the event loop; 400 naming ``field`` for a text too long to fit the context
        or one that is not valid Unicode (a lone surrogate)."""
        if len(text) > max_prompt_chars:
            raise APIError(
                400,
                f"This model's maximum context length is {scheduler.max_model_len} tokens; the {field} has "
                f"{len(text)} characters, more than that many tokens can hold",
                field,
            )
        try:
            text.encode("utf-8")  # JSON lets a lone surrogate ("\\ud800") through; no tokenizer takes it
        except UnicodeEncodeError as e:
            raise APIError(400, f"the {field} is not valid Unicode text ({e.reason} at {e.start})", field) from None
        return await asyncio.get_running_loop().run_in_executor(tokenizing, lambda: tok(text, **kw)["input_ids"])

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        got = request.headers.get("authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "Incorrect API key provided (Authorization: Bearer KEY)", code="invalid_api_key")

    async def read(request: Request, fields: set[str]) -> dict:
        authorize(request)
        length = request.headers.get("content-length", "")
        too_big = APIError(
            413, f"the request body is larger than this server's limit of {max_body_bytes} bytes", code="too_large"
        )
        if length.isdigit() and int(length) > max_body_bytes:
            raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():  # counted as it arrives: a body without Content-Length is bounded too
            size += len(chunk)
            if size > max_body_bytes:
                raise too_big
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise APIError(400, "the request body is not valid JSON") from None
        except RecursionError:
            raise APIError(400, "the request body is nested too deeply") from None
        check_fields(body, fields)
        model = body.get("model")
        if model != served_model_name:
            raise APIError(404, f"The model `{model}` does not exist.", "model", code="model_not_found")
        return body

    page = (resources.files("ivl_fast.serve") / "static" / "chat.html").read_text(encoding="utf-8")

    @app.get("/")
    async def chat_page():
        return HTMLResponse(page)

    @app.get("/health")
    async def health():  # 503 once the decoding worker has stopped on an error: a supervisor restarts the server
        return Response(status_code=503 if scheduler.failed is not None else 200)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        card = {"id": served_model_name, "object": "model", "created": now(), "owned_by": "ivl-fast"}
        return {"object": "list", "data": [card]}

    def check_request(req, prompt_param: str) -> None:
        """The batch's own check of one request (its rules, e.g. one alpha per batch, live there), before anything
        is queued: a 400 naming the parameter."""
        try:
            scheduler.batch.check_request(0, req.slot_request())
        except RequestError as e:
            param = {"max_new_tokens": "max_tokens", "prompt_ids": prompt_param, "sampling": "temperature"}
            param["top_logprobs"] = "logprobs" if prompt_param == "prompt" else "top_logprobs"
            raise APIError(400, str(e), param.get(e.field, e.field)) from None

    def submit(req, n: int):
        loop = asyncio.get_running_loop()
        seqs = []
        try:
            for choice in choice_requests(req, n):
                seqs.append(scheduler.submit(choice, loop))
        except (QueueFull, ShuttingDown) as e:
            for s in seqs:
                s.cancel()
            code = {QueueFull: "queue_full", WorkerStopped: "worker_stopped"}.get(type(e), "shutting_down")
            raise APIError(503, str(e), type_="server_error", code=code) from None
        return seqs

    def _submit_all(reqs, n: int) -> list[list]:
        """Submit every prompt's n sequences, or none (a full queue cancels what this request queued)."""
        parts = []
        try:
            for req in reqs:
                parts.append(submit(req, n))
        except APIError:
            for part in parts:
                for s in part:
                    s.cancel()
            raise
        return parts

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

    async def collect(seq) -> tuple[str, list[int], list[float], list, Finished]:
        text, ids, lps, tops, fin = [], [], [], [], None
        async for ev in events(seq):
            if isinstance(ev, Delta):
                text.append(ev.text)
                ids += ev.token_ids
                lps += ev.logprobs
                tops += ev.top
            else:
                fin = ev
        return "".join(text), ids, lps, tops, fin

    async def watch_disconnect(request: Request, seqs) -> None:
        """Cancel ``seqs`` when the client of a non-streaming request goes away (polled: a closed connection shows
        only when asked)."""
        while not await request.is_disconnected():
            await asyncio.sleep(0.1)
        for s in seqs:
            s.cancel()

    async def run_all(request: Request, seqs):
        watcher = asyncio.create_task(watch_disconnect(request, seqs))
        try:
            return await asyncio.gather(*(collect(s) for s in seqs))
        finally:
            watcher.cancel()
            for s in seqs:
                s.cancel()  # a no-op once finished; frees the slots of the others when one failed

    def sse(payload) -> str:
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    async def stream(path, seqs, make_chunk, first_chunks, usage_of):
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

    # ------------------------------------------------------------------ /v1/completions
    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read(request, COMPLETION_FIELDS)
        refuse(body, "echo", lambda v: v is False)
        refuse(body, "best_of", lambda v: v == body.get("n", 1) or v == 1)
        refuse(body, "logit_bias", lambda v: v == {})
        refuse(body, "suffix", lambda v: False)
        lp = body.get("logprobs")
        k = top_logprobs_field(body, "logprobs", scheduler.max_top_logprobs)
        prompts = []  # one or several prompts (ids, text or None): choices run prompt by prompt
        for p in _split_prompts(body.get("prompt"), vocab_size):
            prompts.append((await tokenize(p, "prompt"), p) if isinstance(p, str) else (list(p), None))
        reqs = []
        for ids, text in prompts:
            req, n, streaming = sampling_request(
                body,
                ids,
                eos=scheduler.eos,
                max_model_len=scheduler.max_model_len,
                default_max_tokens=16,
                logprobs=lp is not None,
                top_logprobs=k,
                text=text,
            )
            check_request(req, "prompt")
            reqs.append(req)
        n_prompt = sum(len(ids) for ids, _ in prompts) * n
        rid, created, model = new_id("cmpl"), now(), served_model_name
        include = (body.get("stream_options") or {}).get("include_usage", False)  # checked by sampling_request
        seqs = [s for part in _submit_all(reqs, n) for s in part]
        if streaming:
            offsets = [0] * len(seqs)

            def chunk(i, ev):
                choice = {"index": i, "text": "", "logprobs": None, "finish_reason": None}
                if isinstance(ev, Delta):
                    choice["text"] = ev.text
                    if lp is not None:
                        choice["logprobs"] = completion_logprobs(tok, ev.token_ids, ev.logprobs, offsets[i], ev.top)
                    offsets[i] += len(ev.text)
                else:
                    choice["finish_reason"] = ev.reason
                return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}

            def usage_chunk(completion):
                return {
                    "id": rid,
                    "object": "text_completion",
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": usage(n_prompt, completion),
                }

            return StreamingResponse(
                stream("/v1/completions", seqs, chunk, [], usage_chunk if include else None),
                media_type="text/event-stream",
            )
        results = await run_all(request, seqs)
        choices = []
        for i, (text, tids, lps, tops, fin) in enumerate(results):
            lpd = completion_logprobs(tok, tids, lps, 0, tops) if lp is not None else None
            choices.append({"index": i, "text": text, "logprobs": lpd, "finish_reason": fin.reason})
        used = usage(n_prompt, sum(r[-1].completion_tokens for r in results))
        metrics.requests.labels("/v1/completions", "200").inc()
        return {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": choices,
            "usage": used,
        }

    # ------------------------------------------------------------------ /v1/chat/completions
    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await read(request, CHAT_FIELDS)
        refuse(body, "logit_bias", lambda v: v == {})
        refuse(body, "tools", lambda v: v == [])
        refuse(body, "tool_choice", lambda v: v == "none")
        refuse(body, "parallel_tool_calls", lambda v: False)
        refuse(body, "response_format", lambda v: v == {"type": "text"})
        lp = body.get("logprobs", False)
        if not isinstance(lp, bool):
            raise APIError(400, f"'logprobs' must be true or false, got {lp!r}", "logprobs")
        top = top_logprobs_field(body, "top_logprobs", scheduler.max_top_logprobs)
        if top and not lp:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise APIError(400, "'messages' must be a non-empty list of {role, content}", "messages")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise APIError(400, f"messages[{i}] must be {{'role': str, 'content': str}}", "messages")
        try:  # vLLM's extra template variables (e.g. {"enable_thinking": false} for Qwen3); null: none
            extra = check_chat_template_kwargs(body.get("chat_template_kwargs"), tok, name="'chat_template_kwargs'")
        except (TypeError, ValueError) as e:
            raise APIError(400, str(e), "chat_template_kwargs") from None
        try:
            conversation = as_messages([{"role": m["role"], "content": m["content"]} for m in msgs])
            text = render_chat(tok, conversation, chat_template_kwargs=extra)
        except Exception as e:  # noqa: BLE001  (a template that refuses the conversation)
            raise APIError(400, f"the chat template refused the messages: {e}", "messages") from None
        ids = await tokenize(text, "messages", add_special_tokens=False)
        req, n, streaming = sampling_request(
            body,
            ids,
            eos=scheduler.eos,
            max_model_len=scheduler.max_model_len,
            default_max_tokens=None,
            logprobs=lp,
            top_logprobs=top,
            text=text,
        )
        check_request(req, "messages")
        rid, created, model = new_id("chatcmpl"), now(), served_model_name
        include = (body.get("stream_options") or {}).get("include_usage", False)  # checked by sampling_request
        seqs = submit(req, n)
        if streaming:

            def base(choices):
                return {
                    "id": rid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": choices,
                }

            firsts = [
                base(
                    [
                        {
                            "index": i,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ]
                )
                for i in range(n)
            ]

            def chunk(i, ev):
                choice = {"index": i, "delta": {}, "logprobs": None, "finish_reason": None}
                if isinstance(ev, Delta):
                    choice["delta"] = {"content": ev.text}
                    if lp:
                        choice["logprobs"] = chat_logprobs(tok, ev.token_ids, ev.logprobs, ev.top)
                else:
                    choice["finish_reason"] = ev.reason
                return base([choice])

            def usage_chunk(completion):
                return {**base([]), "usage": usage(len(ids) * n, completion)}

            return StreamingResponse(
                stream("/v1/chat/completions", seqs, chunk, firsts, usage_chunk if include else None),
                media_type="text/event-stream",
            )
        results = await run_all(request, seqs)
        choices = []
        for i, (content, tids, lps, tops, fin) in enumerate(results):
            choices.append(
                {
                    "index": i,
                    "message": {"role": "assistant", "content": content},
                    "logprobs": chat_logprobs(tok, tids, lps, tops) if lp else None,
                    "finish_reason": fin.reason,
                }
            )
        used = usage(len(ids) * n, sum(r[-1].completion_tokens for r in results))
        metrics.requests.labels("/v1/chat/completions", "200").inc()
        return {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": choices,
            "usage": used,
        }

    return app
