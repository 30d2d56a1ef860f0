"""The OpenAI routes of the server, each a function of the app's state and the request: ``POST /v1/completions``
and ``POST /v1/chat/completions`` (non-streaming, or server-sent events in OpenAI's chunk format ending with
``data: [DONE]``). :mod:`ivl_fast.serve.app` registers them."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import StreamingResponse

from ..chat import as_messages, check_chat_template_kwargs, render_chat
from .answers import run_all, stream
from .protocol import (
    CHAT_FIELDS,
    COMPLETION_FIELDS,
    APIError,
    chat_logprobs,
    completion_logprobs,
    components_field,
    new_id,
    now,
    refuse,
    sampling_request,
    top_logprobs_field,
    usage,
)
from .sequence import Delta
from .state import AppState


def split_prompts(prompt, vocab_size: int) -> list[str | list[int]]:
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


async def completions(state: AppState, request: Request):
    """``POST /v1/completions``: one or several prompts (text or token ids), n choices each."""
    body = await state.read(request, COMPLETION_FIELDS)
    refuse(body, "echo", lambda v: v is False)
    refuse(body, "best_of", lambda v: v == body.get("n", 1) or v == 1)
    refuse(body, "logit_bias", lambda v: v == {})
    refuse(body, "suffix", lambda v: False)
    lp = body.get("logprobs")
    k = top_logprobs_field(body, "logprobs", state.scheduler.max_top_logprobs)
    prompts = []  # one or several prompts (ids, text or None): choices run prompt by prompt
    for p in split_prompts(body.get("prompt"), state.vocab_size):
        prompts.append((await state.tokenize(p, "prompt"), p) if isinstance(p, str) else (list(p), None))
    reqs = []
    for ids, text in prompts:
        req, n, streaming = sampling_request(
            body,
            ids,
            eos=state.scheduler.eos,
            max_model_len=state.scheduler.max_model_len,
            default_max_tokens=16,
            logprobs=lp is not None,
            top_logprobs=k,
            text=text,
            defaults=state.defaults,
            max_components=state.scheduler.max_components,
        )
        state.check_request(req, "prompt")
        reqs.append(req)
    n_prompt = sum(len(ids) for ids, _ in prompts) * n
    rid, created, model = new_id("cmpl"), now(), state.served_model_name
    include = (body.get("stream_options") or {}).get("include_usage", False)  # checked by sampling_request
    seqs = [s for part in state.submit_all(reqs, n) for s in part]
    if streaming:
        offsets = [0] * len(seqs)

        def chunk(i, ev):
            choice = {"index": i, "text": "", "logprobs": None, "finish_reason": None}
            if isinstance(ev, Delta):
                choice["text"] = ev.text
                if lp is not None:
                    choice["logprobs"] = completion_logprobs(state.tok, ev.token_ids, ev.logprobs, offsets[i], ev.top)
                if ev.components:
                    choice["components"] = components_field(state.tok, ev.token_ids, ev.components)
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
            stream(state.metrics, "/v1/completions", seqs, chunk, [], usage_chunk if include else None),
            media_type="text/event-stream",
        )
    results = await run_all(request, seqs)
    choices = []
    for i, (text, tids, lps, tops, comps, fin) in enumerate(results):
        lpd = completion_logprobs(state.tok, tids, lps, 0, tops) if lp is not None else None
        choices.append({"index": i, "text": text, "logprobs": lpd, "finish_reason": fin.reason})
        if comps:
            choices[-1]["components"] = components_field(state.tok, tids, comps)
    used = usage(n_prompt, sum(r[-1].completion_tokens for r in results))
    state.metrics.requests.labels("/v1/completions", "200").inc()
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": used,
    }


def message_text(i: int, m) -> str:
    """A message's content as text: a string, or OpenAI's list of content parts, whose text parts are joined
    with newlines (vLLM's "string" content format); a part of another type (an image) is refused naming it."""
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise APIError(400, f"messages[{i}] must be {{'role': str, 'content': str or parts}}", "messages")
    content = m.get("content")
    if content is None and m["role"] == "assistant":  # an assistant turn that held only tool calls elsewhere
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise APIError(
                    400, f"messages[{i}].content[{j}]: only text parts are supported, got {kind!r}", "messages"
                )
            texts.append(part["text"])
        return "\n".join(texts)
    raise APIError(400, f"messages[{i}].content must be a string or a non-empty list of text parts", "messages")


def render_messages(state: AppState, msgs, extra: dict, add_generation_prompt: bool = True) -> str:
    """The messages rendered with the chat template (--chat-template, else the tokenizer's own, else the default);
    400 naming ``messages`` for malformed messages or a template that refuses them."""
    if not isinstance(msgs, list) or not msgs:
        raise APIError(400, "'messages' must be a non-empty list of {role, content}", "messages")
    contents = [message_text(i, m) for i, m in enumerate(msgs)]  # each message checked before its role is read
    turns = [{"role": m["role"], "content": c} for m, c in zip(msgs, contents, strict=True)]
    try:
        return render_chat(
            state.tok,
            as_messages(turns),
            chat_template_kwargs=extra,
            chat_template=state.chat_template,
            add_generation_prompt=add_generation_prompt,
        )
    except Exception as e:  # noqa: BLE001  (a template that refuses the conversation)
        raise APIError(400, f"the chat template refused the messages: {e}", "messages") from None


async def chat(state: AppState, request: Request):
    """``POST /v1/chat/completions``: the messages rendered with the chat template, n choices."""
    body = await state.read(request, CHAT_FIELDS)
    refuse(body, "logit_bias", lambda v: v == {})
    refuse(body, "tools", lambda v: v == [])
    refuse(body, "tool_choice", lambda v: v == "none")
    refuse(body, "parallel_tool_calls", lambda v: False)
    refuse(body, "response_format", lambda v: v == {"type": "text"})
    lp = body.get("logprobs", False)
    if not isinstance(lp, bool):
        raise APIError(400, f"'logprobs' must be true or false, got {lp!r}", "logprobs")
    top = top_logprobs_field(body, "top_logprobs", state.scheduler.max_top_logprobs)
    if top and not lp:
        raise APIError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
    try:  # vLLM's extra template variables (e.g. {"enable_thinking": false} for Qwen3); null: none
        extra = check_chat_template_kwargs(body.get("chat_template_kwargs"), state.tok, name="'chat_template_kwargs'")
    except (TypeError, ValueError) as e:
        raise APIError(400, str(e), "chat_template_kwargs") from None
    text = render_messages(state, body.get("messages"), extra)
    ids = await state.tokenize(text, "messages", add_special_tokens=False)
    req, n, streaming = sampling_request(
        body,
        ids,
        eos=state.scheduler.eos,
        max_model_len=state.scheduler.max_model_len,
        default_max_tokens=None,
        logprobs=lp,
        top_logprobs=top,
        text=text,
        defaults=state.defaults,
        max_components=state.scheduler.max_components,
    )
    state.check_request(req, "messages")
    rid, created, model = new_id("chatcmpl"), now(), state.served_model_name
    include = (body.get("stream_options") or {}).get("include_usage", False)  # checked by sampling_request
    seqs = state.submit(req, n)
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
                    choice["logprobs"] = chat_logprobs(state.tok, ev.token_ids, ev.logprobs, ev.top)
                if ev.components:
                    choice["components"] = components_field(state.tok, ev.token_ids, ev.components)
            else:
                choice["finish_reason"] = ev.reason
            return base([choice])

        def usage_chunk(completion):
            return {**base([]), "usage": usage(len(ids) * n, completion)}

        return StreamingResponse(
            stream(state.metrics, "/v1/chat/completions", seqs, chunk, firsts, usage_chunk if include else None),
            media_type="text/event-stream",
        )
    results = await run_all(request, seqs)
    choices = []
    for i, (content, tids, lps, tops, comps, fin) in enumerate(results):
        choices.append(
            {
                "index": i,
                "message": {"role": "assistant", "content": content},
                "logprobs": chat_logprobs(state.tok, tids, lps, tops) if lp else None,
                "finish_reason": fin.reason,
            }
        )
        if comps:
            choices[-1]["components"] = components_field(state.tok, tids, comps)
    used = usage(len(ids) * n, sum(r[-1].completion_tokens for r in results))
    state.metrics.requests.labels("/v1/chat/completions", "200").inc()
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": used,
    }
