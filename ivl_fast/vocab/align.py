"""Token surface strings and MinED/DTW alignment of two tokenizations of the same text.

Surface strings follow each tokenizer's conventions: SentencePiece marks a leading space with "▁"; byte-level
BPE (GPT-2 / tiktoken style, e.g. "Ġ") stores bytes as printable characters; byte-fallback tokens look like
``<0x0A>``. A surface is the token's raw bytes, held as a latin-1 ``str`` (one character per byte); special
tokens have an empty surface. Edit distances are taken over the UTF-8 encoding of that string (ASCII bytes
count one, others two; the C++ and Python paths agree exactly).
"""

from __future__ import annotations

import functools

import torch

from .._ext import extension_available, ops


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode table (printable stand-ins for the 256 bytes)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def _is_byte_level(tokens: list[str]) -> bool:
    sample = [t for t in tokens if t]
    return sum("Ġ" in t or "Ċ" in t for t in sample) > max(1, len(sample) // 200)


def surface_strings(tokenizer, vocab: dict[str, int] | None = None) -> list[str]:
    """id -> the bytes the token stands for, as a latin-1 ``str`` (see the module docstring), by the tokenizer's
    own conventions; "" for special tokens and for ids no token has. ``vocab``: ``tokenizer.get_vocab()`` when the
    caller already has it (80 ms for 131072 tokens)."""
    vocab = tokenizer.get_vocab() if vocab is None else vocab
    if not vocab:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has an empty vocabulary")
    size = max(max(vocab.values()) + 1, len(tokenizer))
    tokens = [""] * size
    for tok, i in vocab.items():
        tokens[i] = tok
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    byte_level = _is_byte_level(tokens)
    # str.translate tables (C speed over 131072 tokens): byte-level stand-ins -> the byte as a latin-1 character
    # (a character outside the table, which no byte-level token should hold, becomes "?"); SentencePiece's "▁"
    # -> a space, then UTF-8 bytes as latin-1 characters
    to_bytes = {ord(c): chr(b) for c, b in _byte_decoder().items()}
    out = []
    for i, t in enumerate(tokens):
        if i in special or not t:
            out.append("")
        elif len(t) == 6 and t.startswith("<0x") and t.endswith(">"):  # byte fallback
            out.append(chr(int(t[3:5], 16)))
        elif byte_level:
            raw = t.translate(to_bytes)
            out.append(raw if raw.isascii() or max(raw) <= "\xff" else "".join(c if c <= "\xff" else "?" for c in raw))
        else:
            # bytes as latin-1 characters: tokens holding part of a UTF-8 character stay distinct (decoding them
            # as text would turn them all into the same replacement character)
            out.append(t.replace("▁", " ").encode("utf-8").decode("latin-1"))
    return out


def byte_fallback_ids(vocab: dict[str, int]) -> set[int]:
    """Ids of the byte-fallback tokens (``<0x0A>``...) of a vocabulary (token -> id): SentencePiece emits them only
    for bytes no regular token covers, so a regular token of the same surface is the one the tokenizer uses."""
    return {i for t, i in vocab.items() if len(t) == 6 and t.startswith("<0x") and t.endswith(">")}


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance over UTF-8 bytes (the Python twin of the C++ one)."""
    x, y = a.encode(), b.encode()
    if not x or not y:
        return len(x) + len(y)
    prev = list(range(len(y) + 1))
    for i in range(1, len(x) + 1):
        cur = [i] + [0] * len(y)
        for j in range(1, len(y) + 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x[i - 1] != y[j - 1]))
        prev = cur
    return prev[-1]


def dtw_align(a: list[str], b: list[str]) -> list[tuple[int, int]]:
    """Monotone alignment minimising the summed edit distances (ties: diagonal, then advance a, then b)."""
    n, m = len(a), len(b)
    if not n or not m:
        return []
    inf = float("inf")
    acc = [[inf] * m for _ in range(n)]
    for i in range(n):
        for j in range(m):
            c = edit_distance(a[i], b[j])
            if i == 0 and j == 0:
                best = 0
            else:
                best = min(
                    acc[i - 1][j - 1] if i and j else inf, acc[i - 1][j] if i else inf, acc[i][j - 1] if j else inf
                )
            acc[i][j] = best + c
    i, j = n - 1, m - 1
    path = [(i, j)]
    while i or j:
        if i and j:
            d, u, lft = acc[i - 1][j - 1], acc[i - 1][j], acc[i][j - 1]
            if d <= u and d <= lft:
                i, j = i - 1, j - 1
            elif u <= lft:
                i -= 1
            else:
                j -= 1
        elif i:
            i -= 1
        else:
            j -= 1
        path.append((i, j))
    return path[::-1]


def align_counts(
    base_surface: list[str],
    value_surface: list[str],
    base_seqs: list[list[int]],
    value_seqs: list[list[int]],
    *,
    threads: int = 1,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Count aligned (base id, value id) pairs over texts -> (pairs [M, 2] int64, counts [M] int64), sorted.

    backend: "cpp" (ivl_fast._C, multithreaded), "python" (reference), or "auto" (cpp when built).
    """
    from .segment import Pieces

    pieces = Pieces.from_lists(base_seqs, value_seqs)  # packed as the C++ op reads them
    return align_pieces(base_surface, value_surface, pieces, threads=threads, backend=backend)


def align_pieces(
    base_surface: list[str], value_surface: list[str], pieces, *, threads: int = 1, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`align_counts` over packed pieces (``ivl_fast.vocab.segment.Pieces``): the C++ path reads the packed
    tensors as they are, without building per-piece lists."""
    if backend not in ("auto", "cpp", "python"):
        raise ValueError(f"backend must be auto, cpp or python, got {backend!r}")
    if backend == "cpp" or (backend == "auto" and extension_available()):
        return ops().align_counts(
            base_surface,
            value_surface,
            pieces.base_ids,
            pieces.base_offsets,
            pieces.value_ids,
            pieces.value_offsets,
            int(threads),
        )
    return _align_python(base_surface, value_surface, *pieces.lists())


def _align_python(
    base_surface: list[str], value_surface: list[str], base_seqs: list[list[int]], value_seqs: list[list[int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference path of :func:`align_counts`: DTW per text in Python, pairs counted in a dict."""
    counts: dict[tuple[int, int], int] = {}
    for a_ids, b_ids in zip(base_seqs, value_seqs, strict=True):
        for x in (*a_ids, *b_ids):
            if x < 0:
                raise ValueError(f"negative token id {x}")
        path = dtw_align([base_surface[x] for x in a_ids], [value_surface[x] for x in b_ids])
        for i, j in path:
            key = (a_ids[i], b_ids[j])
            counts[key] = counts.get(key, 0) + 1
    keys = sorted(counts)
    pairs = torch.tensor(keys, dtype=torch.int64).reshape(-1, 2)
    return pairs, torch.tensor([counts[k] for k in keys], dtype=torch.int64)
