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


def render_chat(tokenizer, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
    """``messages`` as text through the tokenizer's own chat template, else :data:`DEFAULT_CHAT_TEMPLATE`;
    ``add_generation_prompt`` ends the text with the assistant's turn header (the prompt of a reply)."""
    template = getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
    )
