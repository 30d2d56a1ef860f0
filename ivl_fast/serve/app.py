"""The OpenAI-compatible HTTP API over a :class:`~ivl_fast.serve.scheduler.Scheduler` (FastAPI).

Routes: ``GET /`` (the chat page, ``static/chat.html``), ``GET /v1/models``, ``GET /v1/models/{id}``,
``POST /v1/completions``, ``POST /v1/chat/completions`` (non-streaming, or server-sent events in OpenAI's chunk
format ending with ``data: [DONE]``), vLLM's ``POST /tokenize``, ``POST /detokenize`` and ``GET /version``,
``GET /health`` (503 once the decoding worker has stopped on an error), ``GET /metrics`` (Prometheus text, with
vLLM's metric names beside ours). ``model`` may be left out of a request (one model is served, as in vLLM).
Errors are OpenAI's JSON shape (:class:`~ivl_fast.serve.protocol.APIError`) for every status, including 404 for
an unknown route, 405 for a wrong method, 413 for a body over ``max_body_bytes`` and 500 for anything unexpected.
With an API key every ``/v1`` route needs ``Authorization:
Bearer KEY``. A client that disconnects, streaming or not, cancels its sequences (their slots are freed at the next
step). Work per request is bounded before it reaches the batch: the body's size, a prompt's length in characters
(checked against the context before tokenizing), and tokenization runs off the event loop (one thread of its own),
so a large prompt never stalls the other streams. ``/metrics`` counts a request when it ends, with its status.

The parts: :class:`~ivl_fast.serve.state.AppState` (what the routes share, and the steps every request takes),
:mod:`~ivl_fast.serve.routes` (the two OpenAI routes), :mod:`~ivl_fast.serve.answers` (collected or streamed
answers). This module only wires them into a FastAPI app.
"""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException

from .. import __version__
from . import DEFAULT_MAX_BODY_BYTES, routes, tokenizer_routes
from .protocol import APIError, now
from .scheduler import Scheduler
from .state import AppState


def build_app(
    scheduler: Scheduler,
    *,
    served_model_name: str,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    defaults: dict | None = None,
    chat_template: str | None = None,
) -> FastAPI:
    """``defaults``: request defaults (:func:`~ivl_fast.serve.protocol.generation_defaults`); ``chat_template``: a
    Jinja chat template used instead of the tokenizer's own."""
    app = FastAPI(title="ivl-fast", docs_url=None, redoc_url=None)
    state = AppState(
        scheduler,
        served_model_name=served_model_name,
        api_key=api_key,
        max_body_bytes=max_body_bytes,
        defaults=defaults,
        chat_template=chat_template,
    )
    metrics = state.metrics
    page = (resources.files("ivl_fast.serve") / "static" / "chat.html").read_text(encoding="utf-8")

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        metrics.requests.labels(request.url.path, str(e.status)).inc()
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):  # a bug: still OpenAI's shape, and counted
        metrics.requests.labels(request.url.path, "500").inc()
        body = APIError(500, f"internal error: {type(e).__name__}: {e}", type_="server_error").body()
        return JSONResponse(body, status_code=500)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, e: HTTPException):  # FastAPI's own 404 / 405, in OpenAI's shape
        metrics.requests.labels(request.url.path, str(e.status_code)).inc()
        message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        err = APIError(e.status_code, message.get(e.status_code, str(e.detail)), code=str(e.status_code))
        return JSONResponse(err.body(), status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        metrics.requests.labels(request.url.path, "400").inc()
        return JSONResponse(APIError(400, f"invalid request: {e.errors()}").body(), status_code=400)

    @app.get("/")
    async def chat_page():
        return HTMLResponse(page)

    @app.get("/health")
    async def health():  # 503 once the decoding worker has stopped on an error: a supervisor restarts the server
        return Response(status_code=503 if scheduler.failed is not None else 200)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    def card() -> dict:
        return {
            "id": served_model_name,
            "object": "model",
            "created": now(),
            "owned_by": "ivl-fast",
            "max_model_len": scheduler.max_model_len,
        }

    @app.get("/v1/models")
    async def models(request: Request):
        state.authorize(request)
        return {"object": "list", "data": [card()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str, request: Request):
        state.authorize(request)
        state.check_model(model)
        return card()

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        return await tokenizer_routes.tokenize(state, request)

    @app.post("/detokenize")
    async def detokenize(request: Request):
        return await tokenizer_routes.detokenize(state, request)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await routes.completions(state, request)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await routes.chat(state, request)

    return app
