"""Tokenizers and chat rendering shared by decoding and training.

A checkpoint's own chat template is used when it has one. Otherwise :data:`DEFAULT_CHAT_TEMPLATE` renders::

    <bos><|system|>\\n{system}\\n<|user|>\\n{user}\\n<|assistant|>\\n{assistant}<eos>\\n ...

and a prompt (``add_generation_prompt=True``) ends with ``<|assistant|>\n``, so that a value network trained
with ivl-fast on a template-less base decodes with the same format.
"""

from __future__ import annotations

import json
from pathlib import Path

DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token if bos_token else '' }}"
    "{% for m in messages %}"
    "{{ '<|' + m['role'] + '|>\n' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token if eos_token else '' }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "tekken.json")


def has_tokenizer(path: str | Path) -> bool:
    """True when ``path`` is a directory holding at least one tokenizer file (``tokenizer.json``,
    ``tokenizer.model``, ``tokenizer_config.json``, ``vocab.json`` or ``tekken.json``)."""
    p = Path(path)
    return p.is_dir() and any((p / f).is_file() for f in _TOKENIZER_FILES)


def load_tokenizer(path: str | Path, *, trust_remote_code: bool = False):
    """A ``transformers`` tokenizer from a directory (offline; no hub access), by ``AutoTokenizer``: the class
    comes from the directory's ``tokenizer_config.json`` and ``config.json``, so one set of files can load as two
    classes (``ivl_fast.tokenizer_identity`` compares what decoding uses). FileNotFoundError when the directory
    has no tokenizer files."""
    from transformers import AutoTokenizer

    if not has_tokenizer(path):
        raise FileNotFoundError(f"no tokenizer files ({', '.join(_TOKENIZER_FILES)}) in {str(path)!r}")
    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code, local_files_only=True)
    except (ValueError, OSError, TypeError, KeyError) as e:  # a file that is there but broken: name it
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        for f in sorted(Path(path).glob("*.json")):
            try:
                json.loads(f.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as bad:
                raise ValueError(f"{str(f)!r} is not valid JSON ({bad}): the tokenizer cannot be loaded") from e
        raise ValueError(f"the tokenizer files in {str(path)!r} cannot be loaded ({why})") from e


def as_messages(prompt, system: str | None = None) -> list[dict]:
    """A string or a list of {role, content} dicts -> a message list (with an optional system message first)."""
    if isinstance(prompt, str):
        msgs = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list | tuple) and all(isinstance(m, dict) for m in prompt):
        msgs = [dict(m) for m in prompt]
        for i, m in enumerate(msgs):
            if "role" not in m or "content" not in m:
                raise ValueError(f"chat message {i} needs 'role' and 'content' keys, got {sorted(m)}")
    else:
        raise TypeError(f"a chat prompt must be a string or a list of message dicts, got {type(prompt).__name__}")
    if system is not None and (not msgs or msgs[0]["role"] != "system"):
        msgs.insert(0, {"role": "system", "content": system})
    return msgs


def is_message_list(x) -> bool:
    """True for a non-empty list of message dicts (``[{"role": ..., "content": ...}, ...]``)."""
    return isinstance(x, list | tuple) and len(x) > 0 and all(isinstance(m, dict) for m in x)


# what ``tokenizer.apply_chat_template`` (and the jinja renderer below it) take as their own arguments: a
# ``chat_template_kwargs`` key among them would change what is rendered or returned (``tokenize``, ``return_dict``)
# or collide with an argument ivl-fast passes (``messages``), so it is refused rather than passed on
RESERVED_CHAT_TEMPLATE_KWARGS = frozenset(
    {
        "messages",
        "conversation",
        "conversations",
        "chat_template",
        "add_generation_prompt",
        "continue_final_message",
        "tokenize",
        "tools",
        "documents",
        "padding",
        "truncation",
        "max_length",
        "return_tensors",
        "return_dict",
        "return_assistant_tokens_mask",
        "sanitize_control_tokens",
        "tokenizer_kwargs",
    }
)


def _reserved_kwargs(tokenizer) -> frozenset[str]:
    """The reserved keys plus every named parameter of this tokenizer's ``apply_chat_template`` (a newer
    transformers may add some)."""
    import inspect

    try:
        params = inspect.signature(type(tokenizer).apply_chat_template).parameters.values()
    except (TypeError, ValueError, AttributeError):
        return RESERVED_CHAT_TEMPLATE_KWARGS
    named = {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name != "self"}
    return RESERVED_CHAT_TEMPLATE_KWARGS | named


def check_chat_template_kwargs(kwargs, tokenizer=None, *, name: str = "chat_template_kwargs") -> dict:
    """``kwargs`` checked as extra variables for a chat template (vLLM's ``chat_template_kwargs``, e.g.
    ``{"enable_thinking": False}`` for Qwen3) -> a new dict ({} for None). TypeError when it is not a dict with
    string keys, ValueError naming the first reserved key (:data:`RESERVED_CHAT_TEMPLATE_KWARGS`, and any named
    parameter of ``tokenizer.apply_chat_template``); ``name``: what the messages call it (a flag, a field)."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict):
        raise TypeError(f"{name} must be an object (template variable -> value), got {type(kwargs).__name__}")
    bad = next((k for k in kwargs if not isinstance(k, str)), None)
    if bad is not None:
        raise TypeError(f"{name} keys must be strings (template variable names), got {bad!r}")
    reserved = _reserved_kwargs(tokenizer) if tokenizer is not None else RESERVED_CHAT_TEMPLATE_KWARGS
    hit = next((k for k in kwargs if k in reserved), None)
    if hit is not None:
        raise ValueError(f"{name} may not set {hit!r}: it is an argument of apply_chat_template, which ivl-fast sets")
    return dict(kwargs)


def render_chat(
    tokenizer,
    messages: list[dict],
    *,
    add_generation_prompt: bool = True,
    chat_template_kwargs: dict | None = None,
    chat_template: str | None = None,
) -> str:
    """``messages`` as text through ``chat_template`` (a Jinja template: a server's --chat-template), else the
    tokenizer's own chat template, else :data:`DEFAULT_CHAT_TEMPLATE`; ``add_generation_prompt`` ends the text with
    the assistant's turn header (the prompt of a reply); ``chat_template_kwargs``: extra template variables (e.g.
    ``{"enable_thinking": False}`` for Qwen3), checked by :func:`check_chat_template_kwargs`."""
    extra = check_chat_template_kwargs(chat_template_kwargs, tokenizer)
    template = chat_template or getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt, **extra
    )
