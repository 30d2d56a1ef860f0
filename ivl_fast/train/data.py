"""Chat demonstrations -> token ids with assistant-only labels -> length-grouped batches.

Accepted records (JSON array or JSONL, one object per line):

- ShareGPT: ``{"conversations": [{"from": "human"|"gpt"|"system", "value": "..."}]}``
- OpenAI:   ``{"messages": [{"role": "user"|"assistant"|"system", "content": "..."}]}``

Each conversation is rendered with the tokenizer's chat template (or :data:`ivl_fast.chat.DEFAULT_CHAT_TEMPLATE`)
and labelled on the characters of assistant turns only (found by rendering each prefix of the conversation
and mapping characters to tokens with the fast tokenizer's offsets). Everything else is -100.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..chat import render_chat

IGNORE = -100
_ROLE = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_ROLE.update({"bot": "assistant", "model": "assistant", "chatgpt": "assistant"})


class DataError(ValueError):
    """A malformed data file (names the file and line)."""


@dataclass
class DataStats:
    conversations: int = 0
    used: int = 0
    skipped_no_assistant: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    tokens: int = 0
    supervised_tokens: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


@dataclass
class Dataset:
    examples: list[Example]
    stats: DataStats = field(default_factory=DataStats)
    data_hash: str = ""


def _normalise(obj, where: str) -> list[dict]:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        turns, rk, ck = obj["messages"], "role", "content"
    elif "conversations" in obj:
        turns, rk, ck = obj["conversations"], "from", "value"
    else:
        raise DataError(f"{where}: expected a 'messages' (OpenAI) or 'conversations' (ShareGPT) list")
    if not isinstance(turns, list):
        raise DataError(f"{where}: the conversation must be a list of turns")
    out = []
    for j, t in enumerate(turns):
        if not isinstance(t, dict) or rk not in t or ck not in t:
            raise DataError(f"{where}: turn {j} needs '{rk}' and '{ck}' keys")
        role = _ROLE.get(str(t[rk]).lower())
        if role is None:
            raise DataError(f"{where}: turn {j} has unknown role {t[rk]!r}")
        if not isinstance(t[ck], str):
            raise DataError(f"{where}: turn {j} content must be a string")
        out.append({"role": role, "content": t[ck]})
    return out


def read_conversations(path: str | Path) -> tuple[list[list[dict]], str]:
    """Parse a JSON/JSONL file -> (conversations, sha256 of the file). Malformed lines name file:line."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data file {str(p)!r} does not exist")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"--data {str(p)!r} is not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start})") from None
    convs = []
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{e.lineno}: malformed JSON ({e.msg})") from e
        for i, obj in enumerate(items):
            convs.append(_normalise(obj, f"{p}: record {i}"))
    else:
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{p}:{n}: malformed JSON ({e.msg})") from e
            convs.append(_normalise(obj, f"{p}:{n}"))
    return convs, hashlib.sha256(raw).hexdigest()


def tokenize_conversation(tokenizer, messages: list[dict]) -> Example:
    """Render the whole conversation; label the tokens that fall inside assistant turns."""
    full = render_chat(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(render_chat(tokenizer, messages[:i], add_generation_prompt=True)) if i else 0
        end = len(render_chat(tokenizer, messages[: i + 1], add_generation_prompt=False))
        if full[:end] != render_chat(tokenizer, messages[: i + 1], add_generation_prompt=False):
            raise DataError("the chat template does not render conversations prefix-consistently")
        spans.append((start, end))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = []
    for tok, (a, b) in zip(ids, offsets, strict=True):
        inside = any(s <= a < e or (a == b and s < a <= e) for s, e in spans) and b > a
        labels.append(tok if inside else IGNORE)
    return Example(ids, labels)


def build_dataset(tokenizer, path: str | Path, *, max_length: int = 4096, drop_long: bool = False) -> Dataset:
    convs, digest = read_conversations(path)
    stats = DataStats(conversations=len(convs))
    examples = []
    for msgs in convs:
        if not any(m["role"] == "assistant" for m in msgs):
            stats.skipped_no_assistant += 1
            continue
        ex = tokenize_conversation(tokenizer, msgs)
        if len(ex.input_ids) > max_length:
            cut = Example(ex.input_ids[:max_length], ex.labels[:max_length])
            if drop_long or not any(x != IGNORE for x in cut.labels[1:]):  # dropped, or nothing left to learn
                stats.dropped_too_long += 1
                continue
            stats.truncated += 1
            ex = cut
        examples.append(ex)
        stats.tokens += len(ex.input_ids)
        stats.supervised_tokens += sum(1 for x in ex.labels if x != IGNORE)
    stats.used = len(examples)
    if not examples:
        raise DataError(f"{path}: no usable conversations (stats: {stats.as_dict()})")
    return Dataset(examples, stats, digest)


def make_batches(lengths: list[int], batch_tokens: int, *, seed: int, epoch: int, group: int = 64) -> list[list[int]]:
    """Length-grouped batches of example indices, each with rows x longest row <= batch_tokens.

    Examples are shuffled (seed, epoch), sorted by length inside windows of ``group * rows`` so that batch
    mates have similar lengths (little padding), then the batch order is shuffled. Deterministic.
    """
    if batch_tokens < max(lengths):
        raise ValueError(
            f"--batch-tokens (batch_tokens) = {batch_tokens} is smaller than the longest example ({max(lengths)} "
            "tokens); raise it or lower --max-length"
        )
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = max(1, group * max(1, batch_tokens // max(1, int(sum(lengths) / len(lengths)))))
    batches = []
    for w in range(0, len(order), window):
        chunk = sorted(order[w : w + window], key=lambda i: lengths[i])
        cur: list[int] = []
        longest = 0
        for i in chunk:
            new_longest = max(longest, lengths[i])
            if cur and new_longest * (len(cur) + 1) > batch_tokens:
                batches.append(cur)
                cur, longest = [], 0
                new_longest = lengths[i]
            cur.append(i)
            longest = new_longest
        if cur:
            batches.append(cur)
    rng.shuffle(batches)
    return batches


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask / labels [B, T] (labels already aligned to input positions)."""
    t = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), t), pad_id, dtype=torch.int64)
    labels = torch.full((len(examples), t), IGNORE, dtype=torch.int64)
    mask = torch.zeros((len(examples), t), dtype=torch.int64)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def padding_fraction(batches: list[list[int]], lengths: list[int]) -> float:
    computed = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    real = sum(lengths[i] for b in batches for i in b)
    return 1.0 - real / computed if computed else 0.0
