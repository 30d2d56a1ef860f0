"""vLLM's tokenizer routes: ``POST /tokenize`` (a prompt, or chat messages rendered as ``/v1/chat/completions``
renders them) and ``POST /detokenize``, with vLLM's request and response fields. :mod:`ivl_fast.serve.app`
registers them."""

from __future__ import annotations

from fastapi import Request

from ..chat import check_chat_template_kwargs
from .protocol import APIError
from .routes import render_messages
from .state import AppState

TOKENIZE_FIELDS = {"model", "prompt", "messages", "add_special_tokens", "add_generation_prompt"}
TOKENIZE_FIELDS |= {"chat_template_kwargs", "return_token_strs"}
DETOKENIZE_FIELDS = {"model", "tokens"}


def _flag(body: dict, name: str, default: bool) -> bool:
    v = body.get(name, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise APIError(400, f"'{name}' must be true or false, got {v!r}", name)
    return v


async def tokenize(state: AppState, request: Request) -> dict:
    """-> {count, max_model_len, tokens, token_strs}: the ids the server would decode from (a prompt: with the
    tokenizer's special tokens unless add_special_tokens=false; messages: the chat template's text, whose special
    tokens are its own)."""
    body = await state.read(request, TOKENIZE_FIELDS)
    if ("prompt" in body) == ("messages" in body):
        raise APIError(400, "give exactly one of 'prompt' or 'messages'", "prompt")
    if "prompt" in body:
        prompt = body["prompt"]
        if not isinstance(prompt, str):
            raise APIError(400, "'prompt' must be a string", "prompt")
        ids = await state.tokenize(prompt, "prompt", add_special_tokens=_flag(body, "add_special_tokens", True))
    else:
        try:
            kwargs = body.get("chat_template_kwargs")
            extra = check_chat_template_kwargs(kwargs, state.tok, name="'chat_template_kwargs'")
        except (TypeError, ValueError) as e:
            raise APIError(400, str(e), "chat_template_kwargs") from None
        text = render_messages(state, body["messages"], extra, _flag(body, "add_generation_prompt", True))
        ids = await state.tokenize(text, "messages", add_special_tokens=_flag(body, "add_special_tokens", False))
    strs = state.tok.convert_ids_to_tokens(ids) if _flag(body, "return_token_strs", False) else None
    return {"count": len(ids), "max_model_len": state.scheduler.max_model_len, "tokens": ids, "token_strs": strs}


async def detokenize(state: AppState, request: Request) -> dict:
    """-> {prompt}: the text of token ids (400 naming ``tokens`` for ids outside the vocabulary)."""
    body = await state.read(request, DETOKENIZE_FIELDS)
    ids = body.get("tokens")
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise APIError(400, "'tokens' must be a list of token ids", "tokens")
    bad = next((i for i in ids if not 0 <= i < state.vocab_size), None)
    if bad is not None:
        raise APIError(400, f"'tokens' holds token id {bad}, outside the vocabulary [0, {state.vocab_size})", "tokens")
    return {"prompt": state.tok.decode(ids)}
