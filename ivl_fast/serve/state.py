"""AppState: what every route of the server shares, owned by one object (the scheduler, the tokenizer, the limits,
the API key, the metrics) and the request-level steps every route takes: authorize, read the body, tokenize off
the event loop, check a request against the batch, submit its choices."""

from __future__ import annotations

import asyncio
import hmac
import json
from concurrent.futures import ThreadPoolExecutor

from fastapi import Request

from ..decode.slot_request import RequestError
from .metrics import Metrics
from .protocol import APIError, check_fields, choice_requests
from .scheduler import Scheduler
from .sequence import QueueFull, ShuttingDown, WorkerStopped


def longest_token_chars(tok) -> int:
    """The most characters of text one token can stand for (its string's length bounds it: a byte-level or
    SentencePiece token string has at least one character per character of text it decodes to)."""
    return max(len(t) for t in tok.convert_ids_to_tokens(list(range(len(tok)))) if t is not None)


class AppState:
    """The server's state, one per app; the routes (:mod:`ivl_fast.serve.routes`) read it, nothing else does."""

    def __init__(
        self,
        scheduler: Scheduler,
        *,
        served_model_name: str,
        api_key: str | None,
        max_body_bytes: int,
        defaults: dict | None = None,
        chat_template: str | None = None,
    ):
        self.scheduler = scheduler
        self.defaults = dict(defaults or {})  # request defaults (the checkpoint's generation config, vLLM's way)
        self.chat_template = chat_template  # --chat-template: instead of the tokenizer's own
        self.metrics: Metrics = scheduler.metrics
        self.tok = scheduler.tokenizer
        self.vocab_size = scheduler.vocab_size
        self.served_model_name, self.api_key, self.max_body_bytes = served_model_name, api_key, max_body_bytes
        # a text longer than this many characters cannot fit the context whatever it tokenizes to: refused
        # untokenized
        self.max_prompt_chars = scheduler.max_model_len * longest_token_chars(self.tok)
        # one thread tokenizes, in arrival order: the event loop (and so every stream) never waits for a long
        # prompt, and one tokenizer is never used by two requests at once
        self.tokenizing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ivl-fast-tokenize")

    async def tokenize(self, text: str, field: str, **kw) -> list[int]:
        """Token ids of ``text`` off the event loop; 400 naming ``field`` for a text too long to fit the context
        or one that is not valid Unicode (a lone surrogate)."""
        if len(text) > self.max_prompt_chars:
            raise APIError(
                400,
                f"This model's maximum context length is {self.scheduler.max_model_len} tokens; the {field} has "
                f"{len(text)} characters, more than that many tokens can hold",
                field,
            )
        try:
            text.encode("utf-8")  # JSON lets a lone surrogate ("\\ud800") through; no tokenizer takes it
        except UnicodeEncodeError as e:
            raise APIError(400, f"the {field} is not valid Unicode text ({e.reason} at {e.start})", field) from None
        tok = self.tok
        return await asyncio.get_running_loop().run_in_executor(self.tokenizing, lambda: tok(text, **kw)["input_ids"])

    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        got = request.headers.get("authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {self.api_key}".encode()):
            raise APIError(401, "Incorrect API key provided (Authorization: Bearer KEY)", code="invalid_api_key")

    async def read(self, request: Request, fields: set[str]) -> dict:
        """The authorized request's JSON body, bounded in size as it arrives, with only ``fields`` and this
        server's model name (OpenAI-shaped 401, 413, 400 or 404 otherwise)."""
        self.authorize(request)
        limit = self.max_body_bytes
        length = request.headers.get("content-length", "")
        too_big = APIError(
            413, f"the request body is larger than this server's limit of {limit} bytes", code="too_large"
        )
        if length.isdigit() and int(length) > limit:
            raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():  # counted as it arrives: a body without Content-Length is bounded too
            size += len(chunk)
            if size > limit:
                raise too_big
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise APIError(400, "the request body is not valid JSON") from None
        except RecursionError:
            raise APIError(400, "the request body is nested too deeply") from None
        check_fields(body, fields)
        self.check_model(body.get("model"))
        return body

    def check_model(self, model) -> None:
        """``model``: this server's name, or left out (one model is served: vLLM's rule); 404 otherwise."""
        if model is not None and model != self.served_model_name:
            raise APIError(404, f"The model `{model}` does not exist.", "model", code="model_not_found")

    def check_request(self, req, prompt_param: str) -> None:
        """The batch's own check of one request (its rules, e.g. one alpha per batch, live there), before anything
        is queued: a 400 naming the parameter."""
        try:
            self.scheduler.batch.check_request(0, req.slot_request())
        except RequestError as e:
            param = {"max_new_tokens": "max_tokens", "prompt_ids": prompt_param, "sampling": "temperature"}
            param["top_logprobs"] = "logprobs" if prompt_param == "prompt" else "top_logprobs"
            raise APIError(400, str(e), param.get(e.field, e.field)) from None

    def submit(self, req, n: int) -> list:
        """Queue the ``n`` choices of ``req``, or none (a full queue or a server shutting down: 503)."""
        loop = asyncio.get_running_loop()
        seqs = []
        try:
            for choice in choice_requests(req, n):
                seqs.append(self.scheduler.submit(choice, loop))
        except (QueueFull, ShuttingDown) as e:
            for s in seqs:
                s.cancel()
            code = {QueueFull: "queue_full", WorkerStopped: "worker_stopped"}.get(type(e), "shutting_down")
            raise APIError(503, str(e), type_="server_error", code=code) from None
        return seqs

    def submit_all(self, reqs, n: int) -> list[list]:
        """Submit every prompt's n sequences, or none (a full queue cancels what this request queued)."""
        parts = []
        try:
            for req in reqs:
                parts.append(self.submit(req, n))
        except APIError:
            for part in parts:
                for s in part:
                    s.cancel()
            raise
        return parts
