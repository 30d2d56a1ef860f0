"""OpenAI request bodies -> sequences to decode, and the response / chunk / error shapes, as the OpenAI API
defines them (``/v1/completions``, ``/v1/chat/completions``), plus vLLM's extra sampling fields and ``alpha``.

Every field is either implemented or refused with a 400 naming it; nothing is ignored silently (metadata fields
such as ``user`` carry no decoding meaning and are accepted).
"""

from __future__ import annotations

import dataclasses
import math
import time
import uuid

from ..checks import is_int
from ..sampling import FLOAT32_MAX, SamplingParams
from .sequence import SequenceRequest


class APIError(Exception):
    """An error response in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, type_: str | None = None, code=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or {401: "authentication_error", 404: "invalid_request_error", 503: "server_error"}.get(
            status, "invalid_request_error"
        )

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


SAMPLING_FIELDS = {
    "max_tokens",
    "temperature",
    "top_p",
    "n",
    "stop",
    "seed",
    "stream",
    "stream_options",
    "presence_penalty",
    "frequency_penalty",
    "top_k",
    "min_p",
    "repetition_penalty",
    "ignore_eos",
    "stop_token_ids",
    "alpha",
    "return_components",  # ivl-fast's extension: what the value network changed, per token
}
METADATA_FIELDS = {"user", "metadata", "store"}  # no decoding meaning
COMPLETION_FIELDS = {"model", "prompt", "logprobs", "echo", "best_of", "logit_bias", "suffix"} | SAMPLING_FIELDS
CHAT_FIELDS = {"model", "messages", "logprobs", "top_logprobs", "max_completion_tokens", "logit_bias"}
CHAT_FIELDS |= SAMPLING_FIELDS | {"tools", "tool_choice", "response_format", "parallel_tool_calls"}
CHAT_FIELDS |= {"chat_template_kwargs"}  # vLLM's: extra variables for the chat template


def _number(body: dict, name: str, default, lo=None, hi=None, integer=False):
    v = body.get(name, default)
    if v is None:
        return default
    ok = not isinstance(v, bool) and isinstance(v, int if integer else int | float)
    if ok and not integer:
        ok = math.isfinite(v)
    if ok and lo is not None:
        ok = v >= lo
    if ok and hi is not None:
        ok = v <= hi
    if not ok:
        kind = "an integer" if integer else "a number"
        rng = f" in [{lo}, {hi}]" if lo is not None and hi is not None else (f" >= {lo}" if lo is not None else "")
        raise APIError(400, f"'{name}' must be {kind}{rng}, got {v!r}", name)
    return v


def check_fields(body, allowed: set[str]) -> None:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - allowed - METADATA_FIELDS)
    if unknown:
        raise APIError(
            400, f"unsupported field '{unknown[0]}' (ivl-fast implements: {', '.join(sorted(allowed))})", unknown[0]
        )


def sampling_request(
    body: dict,
    prompt_ids: list[int],
    *,
    eos: frozenset[int],
    max_model_len: int,
    default_max_tokens: int | None,
    logprobs: bool,
    top_logprobs: int = 0,
    text: str | None = None,
    defaults: dict | None = None,
    max_components: int = 0,
) -> tuple[SequenceRequest, int, bool]:
    """The fields shared by both endpoints -> (a sequence request, n, stream). ``top_logprobs``: alternatives per
    token (checked by the endpoint, whose field it is). ``defaults``: the values of fields a request leaves out
    (:func:`generation_defaults`, the checkpoint's generation config as vLLM reads it), else OpenAI's."""
    d = defaults or {}
    temperature = _number(body, "temperature", d.get("temperature", 1.0), 0.0, 2.0)
    seed = body.get("seed")
    if seed is not None and (not is_int(seed) or not -(2**63) <= seed < 2**63):
        raise APIError(400, f"'seed' must be an integer in [-2^63, 2^63), got {seed!r}", "seed")
    if temperature == 0:  # greedy decoding draws nothing: a seed changes nothing there (and costs nothing)
        seed = None
    top_p = _number(body, "top_p", d.get("top_p", 1.0), 0.0, 1.0)
    if top_p == 0:
        raise APIError(400, "'top_p' must be in (0, 1], got 0", "top_p")
    top_k = _number(body, "top_k", d.get("top_k", -1), -1, integer=True)
    min_p = _number(body, "min_p", d.get("min_p", 0.0), 0.0, 1.0)
    rep = _number(body, "repetition_penalty", d.get("repetition_penalty", 1.0), 0.0)
    if rep == 0:
        raise APIError(400, "'repetition_penalty' must be > 0, got 0", "repetition_penalty")
    pres = _number(body, "presence_penalty", 0.0, -2.0, 2.0)
    freq = _number(body, "frequency_penalty", 0.0, -2.0, 2.0)
    alpha = body.get("alpha")
    if alpha is not None:  # it lives in float32 on the device: -1e300 is finite here, -inf there
        alpha = float(_number(body, "alpha", None, -FLOAT32_MAX, FLOAT32_MAX))
    n = _number(body, "n", 1, 1, 16, integer=True)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, f"'stream' must be true or false, got {stream!r}", "stream")
    opts = body.get("stream_options")
    if opts is not None and (
        not stream
        or not isinstance(opts, dict)
        or set(opts) - {"include_usage"}
        or not isinstance(opts.get("include_usage", False), bool)
    ):
        raise APIError(400, "'stream_options' takes only {\"include_usage\": bool}, with stream=true", "stream_options")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else (stop or [])
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, "'stop' must be a non-empty string or a list of up to 4 of them", "stop")
    ids = body.get("stop_token_ids") or []
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise APIError(400, "'stop_token_ids' must be a list of token ids", "stop_token_ids")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise APIError(400, f"'ignore_eos' must be true or false, got {ignore_eos!r}", "ignore_eos")
    room = max_model_len - len(prompt_ids)
    if room < 1:
        raise APIError(
            400,
            f"This model's maximum context length is {max_model_len} tokens; the prompt has {len(prompt_ids)} tokens",
            "messages" if "messages" in body else "prompt",
        )
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, name, min(d.get("max_tokens") or default_max_tokens or room, room), 1, integer=True)
    if max_tokens > room:
        raise APIError(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{len(prompt_ids) + max_tokens} tokens ({len(prompt_ids)} in the prompt, {max_tokens} for the "
            "completion). Please reduce the prompt or the completion length.",
            name,
        )
    greedy = temperature == 0
    try:  # what float32 cannot hold (a repetition_penalty of 1e308, a temperature of 1e-50) is refused here
        sampling = SamplingParams(
            do_sample=not greedy,
            temperature=1.0 if greedy else temperature,
            top_k=0 if top_k == -1 else top_k,  # one above the vocabulary keeps every token (transformers' rule)
            top_p=top_p,
            min_p=min_p,
            repetition_penalty=rep,
            presence_penalty=pres,
            frequency_penalty=freq,
        )
    except ValueError as e:  # SamplingParams names the field first
        raise APIError(400, str(e), str(e).split()[0]) from None
    stops = frozenset(ids) | (frozenset() if ignore_eos else eos)
    comps = body.get("return_components")
    if comps and not max_components:
        why = "--max-components 0, a draft model, or one model only"
        raise APIError(400, f"'return_components' is not available on this server ({why})", "return_components")
    if comps is not None and (not is_int(comps) or not 0 <= comps <= max_components):
        msg = f"'return_components' must be an integer in [0, {max_components}], got {comps!r}"
        raise APIError(400, msg, "return_components")
    req = SequenceRequest(
        list(prompt_ids), max_tokens, sampling, alpha, tuple(stop), stops, logprobs, top_logprobs, seed, text,
        comps or 0,
    )  # fmt: skip
    return req, n, stream


# the generation config fields vLLM takes as request defaults (its --generation-config auto), by request field
GENERATION_DEFAULTS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}


def generation_defaults(config) -> dict:
    """A checkpoint's generation config (a transformers GenerationConfig, or None) -> the request defaults it sets,
    as vLLM reads it: only the fields the file sets (``to_diff_dict``), ``max_new_tokens`` as ``max_tokens``;
    ``top_k`` 0 ("off" in transformers) as -1 (OpenAI's off)."""
    if config is None:
        return {}
    set_ = config.to_diff_dict() if hasattr(config, "to_diff_dict") else dict(config)
    out = {field: set_[name] for name, field in GENERATION_DEFAULTS.items() if set_.get(name) is not None}
    if out.get("top_k") == 0:
        out["top_k"] = -1
    return out


def choice_requests(req: SequenceRequest, n: int) -> list[SequenceRequest]:
    """The ``n`` choices of a request; with a seed, choice i draws from seed + i (vLLM's rule), so the choices
    differ from each other and each is reproducible."""
    if req.seed is None:
        return [req] * n
    wrap = lambda s: (s + 2**63) % 2**64 - 2**63  # noqa: E731  (stay in int64)
    return [dataclasses.replace(req, seed=wrap(req.seed + i)) for i in range(n)]


def top_logprobs_field(body: dict, name: str, hi: int = 20) -> int:
    """An alternatives count in [0, hi] (``top_logprobs`` of chat, ``logprobs`` of completions)."""
    v = body.get(name)
    if v is None:
        return 0
    if not is_int(v) or not 0 <= v <= max(hi, 20):
        raise APIError(400, f"'{name}' must be an integer in [0, {max(hi, 20)}], got {v!r}", name)
    if v > hi:
        why = "a server with a draft model gives none" if hi == 0 else f"at most {hi} here"
        raise APIError(400, f"'{name}'={v} is not supported by this server ({why})", name)
    return v


def refuse(body: dict, name: str, ok) -> None:
    """Refuse a field whose value asks for something not implemented (ok(value) False)."""
    if name in body and body[name] is not None and not ok(body[name]):
        raise APIError(400, f"'{name}'={body[name]!r} is not supported by ivl-fast", name)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def components_field(tokenizer, token_ids: list[int], components: list) -> list[dict]:
    """ivl-fast's ``components`` of a choice: per token its text, whether the value network changed the choice
    (the combination's first token is not the base's) and the top entries of the base alone (log-probabilities),
    of the value network's delta alpha * z_value (logits) and of the combination (log-probabilities)."""
    out = []
    for t, (base, value, combined) in zip(token_ids, components, strict=True):
        out.append(
            {
                "token": tokenizer.decode([t]),
                "changed": base[0][0] != combined[0][0],
                "base": [{"token": tokenizer.decode([i]), "logprob": v} for i, v in base],
                "value": [{"token": tokenizer.decode([i]), "delta": v} for i, v in value],
                "combined": [{"token": tokenizer.decode([i]), "logprob": v} for i, v in combined],
            }
        )
    return out


def chat_logprobs(tokenizer, token_ids: list[int], logprobs: list[float], top: list | None = None) -> dict:
    """OpenAI's chat ``logprobs``: per token its string, log-probability, UTF-8 bytes and ``top_logprobs`` (the
    alternatives asked for, most likely first: [(id, logprob), ...] per token in ``top``)."""
    content = []
    for i, (t, lp) in enumerate(zip(token_ids, logprobs, strict=True)):
        s = tokenizer.decode([t])
        alts = []
        for a, alp in top[i] if top else []:
            a_s = tokenizer.decode([a])
            alts.append({"token": a_s, "logprob": alp, "bytes": list(a_s.encode())})
        content.append({"token": s, "logprob": lp, "bytes": list(s.encode()), "top_logprobs": alts})
    return {"content": content}


def completion_logprobs(
    tokenizer, token_ids: list[int], logprobs: list[float], offset: int, top: list | None = None
) -> dict:
    """OpenAI's legacy ``logprobs``: tokens, their log-probabilities, text offsets and, with ``logprobs`` = k > 0,
    ``top_logprobs``: per token a {token: logprob} of the k most likely and the sampled one (up to k + 1 entries,
    as OpenAI returns them; None for k = 0)."""
    tokens = [tokenizer.decode([t]) for t in token_ids]
    offsets, at = [], offset
    for s in tokens:
        offsets.append(at)
        at += len(s)
    tops = None
    if top:
        tops = []
        for s, lp, alts in zip(tokens, logprobs, top, strict=True):
            d = {s: lp}  # the sampled token first: alternatives whose text collides with it (two byte tokens
            for a, alp in alts:  # that each decode to "\ufffd") do not replace its logprob
                d.setdefault(tokenizer.decode([a]), alp)
            tops.append(d)
    return {"tokens": tokens, "token_logprobs": list(logprobs), "top_logprobs": tops, "text_offset": offsets}
