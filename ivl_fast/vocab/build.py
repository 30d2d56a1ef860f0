"""Building, saving, loading and evaluating base->value vocabulary maps (MinED/DTW, as in FuseLLM)."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from ..safe_output import UnsafeOutputError, replace_file_atomically
from . import DEFAULT_TOP_K
from .align import align_pieces, byte_fallback_ids, surface_strings
from .segment import NoOffsets, Pieces, cut_in_context, encode_with_offsets


def _tokenizer(t):
    if isinstance(t, str | Path):
        from ..chat import load_tokenizer

        return load_tokenizer(t)
    return t


def tokenizer_hash(tokenizer, vocab: dict[str, int] | None = None) -> str:
    """Content hash of a tokenizer's vocabulary (token -> id), independent of where it was loaded from.
    ``vocab``: ``tokenizer.get_vocab()`` when the caller already has it."""
    vocab = tokenizer.get_vocab() if vocab is None else vocab
    if not vocab:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has an empty vocabulary")
    text = "".join(f"{i}\t{tok}\n" for tok, i in sorted(vocab.items(), key=lambda kv: kv[1]))
    return hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()


def encode_all(tokenizer, texts: list[str], bar=None) -> tuple[list[list[int]], list[int]]:
    """(ids, failed): the token ids of each text (no special tokens), None for a text the tokenizer cannot
    encode, and those texts' indices (reported, not fatal). ``bar``: a progress bar advanced once per text."""
    from transformers import PreTrainedTokenizerFast

    rust = tokenizer._tokenizer if isinstance(tokenizer, PreTrainedTokenizerFast) else None  # `tokenizers`' own
    if rust is not None and hasattr(rust, "encode_batch_fast") and rust.truncation is None and rust.padding is None:
        try:  # one batched call, on all cores, without offsets: 4x faster than one text at a time
            seqs = [e.ids for e in rust.encode_batch_fast(texts, add_special_tokens=False)]
            if bar is not None:
                bar.update(len(texts))
            return seqs, []
        except Exception:  # some text fails: one at a time below, to lose only the texts that fail
            pass
    seqs, failed = [], []
    for i, t in enumerate(texts):
        if bar is not None:
            bar.update(1)
        try:
            seqs.append(list(tokenizer(t, add_special_tokens=False)["input_ids"]))
        except Exception:  # a tokenizer error on one text must not lose the whole build
            seqs.append(None)
            failed.append(i)
    return seqs, failed


def split_corpus(texts: list[str], max_chars: int = 256) -> list[str]:
    """Lines, and long lines cut into pieces of <= max_chars, at the last space (at max_chars itself when the
    line has no space past half of it); blank pieces are dropped. The fallback of :func:`pieces_of` for a
    tokenizer without character offsets (the pieces are tokenized one by one, out of context)."""
    out = []
    for text in texts:
        for line in text.splitlines():
            while len(line) > max_chars:
                cut = line.rfind(" ", 0, max_chars)
                cut = cut if cut > max_chars // 2 else max_chars
                if line[:cut].strip():  # a run of spaces longer than max_chars // 2 gives blank pieces: no text
                    out.append(line[:cut])
                line = line[cut:]
            if line.strip():
                out.append(line)
    return out


# characters per piece when a held-out text is compared as multisets (evaluate_map); the build cuts finer
EVAL_PIECE_CHARS = 256


def pieces_of(
    base_tokenizer, value_tokenizer, texts: list[str], bar=None, *, max_chars: int = 1
) -> tuple[Pieces, list[int], str]:
    """The texts as pieces to align -> (pieces, indices of the units skipped because a tokenizer failed on them,
    how they were cut: "in context" or "lines").

    In context (``ivl_fast.vocab.segment``): each text tokenized whole by both tokenizers and cut where both have a
    token boundary, so every piece holds the tokens of running text (``max_chars``: see
    :func:`~ivl_fast.vocab.segment.cut_in_context`; 1, the build's: at every common boundary). When a tokenizer
    cannot give character offsets (a slow tokenizer): the texts' lines (:func:`split_corpus`), each tokenized
    alone, and the skipped indices are of lines. ``bar``: a progress bar, advanced once per text and tokenizer."""
    try:
        b_enc, b_fail = encode_with_offsets(base_tokenizer, texts, bar)
        v_enc, v_fail = encode_with_offsets(value_tokenizer, texts, bar)
    except NoOffsets:
        lines = split_corpus(texts)
        if bar is not None:
            bar.reset(total=2 * len(lines))
        bseqs, bfail = encode_all(base_tokenizer, lines, bar)
        vseqs, vfail = encode_all(value_tokenizer, lines, bar)
        failed = set(bfail) | set(vfail)
        keep = [i for i in range(len(lines)) if i not in failed]
        return Pieces.from_lists([bseqs[i] for i in keep], [vseqs[i] for i in keep]), sorted(failed), "lines"
    failed = set(b_fail) | set(v_fail)
    keep = [i for i in range(len(texts)) if i not in failed]
    pieces = cut_in_context(
        [b_enc[i] for i in keep], [v_enc[i] for i in keep], [len(texts[i]) for i in keep], max_chars=max_chars
    )
    return pieces, sorted(failed), "in context"


def _merge_counts(found: list[tuple[torch.Tensor, torch.Tensor]], v_value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum the (pairs [M, 2], counts [M]) of several chunks -> one sorted list of distinct pairs."""
    if not found:
        return torch.zeros((0, 2), dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    pairs = torch.cat([p.reshape(-1, 2) for p, _ in found])
    counts = torch.cat([c for _, c in found])
    keys, inverse = torch.unique(pairs[:, 0] * v_value + pairs[:, 1], sorted=True, return_inverse=True)
    total = torch.zeros(keys.numel(), dtype=torch.int64).index_add_(0, inverse, counts)
    return torch.stack([keys // v_value, keys % v_value], dim=1), total


def identical_ids(base_surface: list[str], value_surface: list[str], value_byte_fallback: set[int]) -> torch.Tensor:
    """[V_base] int64: for each base token, a value token with the same surface (-1: none). A regular value token
    is preferred to a byte-fallback one (``<0x2E>`` and ``.`` share the surface ".", but the tokenizer only ever
    emits the byte token for bytes no regular token covers); among equals, the lower id."""
    by_surface: dict[str, int] = {}
    for i, s in enumerate(value_surface):
        if s and (s not in by_surface or (by_surface[s] in value_byte_fallback and i not in value_byte_fallback)):
            by_surface[s] = i
    return torch.tensor([by_surface.get(s, -1) if s else -1 for s in base_surface], dtype=torch.int64)


def special_pairs(base_tokenizer, value_tokenizer) -> list[tuple[int, int]]:
    """(base id, value id) of the special tokens both tokenizers have by role (EOS, BOS, UNK, PAD). They have no
    surface, so the alignment never pairs them; without an entry a base's EOS would push no probability onto the
    value's EOS, and cross-vocabulary decoding could not end a sequence where the base would."""
    out: list[tuple[int, int]] = []
    for role in ("eos_token_id", "bos_token_id", "unk_token_id", "pad_token_id"):
        b, v = getattr(base_tokenizer, role, None), getattr(value_tokenizer, role, None)
        if isinstance(b, int) and isinstance(v, int) and all(b != x for x, _ in out):
            out.append((b, v))
    return out


def twins(base_tokenizer, value_tokenizer, base_surface: list[str], value_surface: list[str], value_vocab: dict):
    """[V_base] int64: the value token each base token falls back on when the corpus never aligned it (-1: none):
    the identical surface (:func:`identical_ids`), and for special tokens the value's token of the same role
    (:func:`special_pairs`: they have no surface, so the alignment never pairs them)."""
    same = identical_ids(base_surface, value_surface, byte_fallback_ids(value_vocab))
    for b_id, v_id in special_pairs(base_tokenizer, value_tokenizer):
        same[b_id] = v_id
    return same


def pair_distances(pairs: torch.Tensor, base_surface: list[str], value_surface: list[str]) -> torch.Tensor:
    """[M] int64: the edit distance between the surfaces of each aligned (base, value) pair (pairs [M, 2])."""
    from .align import edit_distance

    return torch.tensor(
        [edit_distance(base_surface[b], value_surface[v]) for b, v in pairs.tolist()], dtype=torch.int64
    )


def rank_candidates(
    pairs: torch.Tensor,
    counts: torch.Tensor,
    same: torch.Tensor,
    top_k: int,
    distance: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The map's rows from the aligned pairs (pairs [M, 2] (base, value) sorted, counts [M]) -> (crow [V_base + 1],
    col [nnz], val [nnz], argmax [V_base]).

    Per base token the value tokens it was aligned to are ranked by count (how often the alignment paired them);
    a tie goes to the value token nearer in edit distance (``distance`` [M], :func:`pair_distances`; when given),
    then to the one with the same surface, then to the lower id. The distance matters where one base token spans
    several value tokens: SentencePiece's " re" against byte-level "Ġ" "re" pairs it once with each, and "re"
    shares more of it than " ". The top ``top_k`` are kept and
    weighted by their counts (normalised per row). A base token the alignment never saw is mapped to the value
    token with the same surface (``same`` [V_base], -1: none), weight 1, if there is one. ``argmax``: the authors'
    map from the same counts (the most paired value token, ties to the lower id; -1 where never aligned), the
    baseline :func:`evaluate_map` compares with."""
    vb = same.numel()
    b, v = pairs[:, 0], pairs[:, 1]
    seen = torch.bincount(b, minlength=vb)
    first = torch.cumsum(seen, 0) - seen  # each row's first position once sorted by base token

    def by_row(*keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The pairs' order sorted by (base, *keys, value id), ascending (stable sorts, last key first), and each
        pair's rank inside its row in that order."""
        order = torch.argsort(v, stable=True)
        for key in reversed(keys):
            order = order[torch.argsort(key[order], stable=True)]
        order = order[torch.argsort(b[order], stable=True)]
        return order, torch.arange(order.numel()) - first[b[order]]

    # the map: count desc, then the nearer surface, then the identical surface first (0), then the value id
    near = torch.zeros_like(counts) if distance is None else distance
    order, rank = by_row(-counts, near, (v != same[b]).to(torch.int64))
    b_s, v_s, c_s = b[order], v[order], counts[order]
    # the authors' argmax: most pairs, ties to the lower id (not to the identical surface)
    o2, r2 = by_row(-counts)
    argmax = torch.full((vb,), -1, dtype=torch.int64)
    argmax[b[o2[r2 == 0]]] = v[o2[r2 == 0]]
    keep = rank < top_k
    kb, kv, kc = b_s[keep], v_s[keep], c_s[keep].to(torch.float64)
    # unseen base tokens with an identical value surface: one entry of weight 1
    fill = torch.nonzero((seen == 0) & (same >= 0)).flatten()
    rows_b = torch.cat([kb, fill])
    rows_v = torch.cat([kv, same[fill]])
    rows_c = torch.cat([kc, torch.ones(fill.numel(), dtype=torch.float64)])
    o3 = torch.argsort(rows_b, stable=True)  # fill rows are after every kept entry; their rows hold nothing else
    rows_b, rows_v, rows_c = rows_b[o3], rows_v[o3], rows_c[o3]
    total = torch.zeros(vb, dtype=torch.float64).index_add_(0, rows_b, rows_c)
    val = (rows_c / total[rows_b]).to(torch.float32)
    crow = torch.zeros(vb + 1, dtype=torch.int64)
    crow[1:] = torch.cumsum(torch.bincount(rows_b, minlength=vb), 0)
    return crow, rows_v, val, argmax


def build_map(
    base_tokenizer,
    value_tokenizer,
    texts: list[str],
    *,
    top_k: int = DEFAULT_TOP_K,
    threads: int | None = None,
    backend: str = "auto",
    progress: bool = False,
):
    """-> (VocabMap, stats). See VocabMap.build. ``progress``: tqdm bars on stderr (tokenizing, aligning)."""
    from tqdm.auto import tqdm

    from . import VocabMap

    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}")
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise ValueError("the corpus is empty: no text to align")
    bt, vt = _tokenizer(base_tokenizer), _tokenizer(value_tokenizer)
    seconds = {}  # where the build's time goes
    t0 = time.perf_counter()
    bvocab, vvocab = bt.get_vocab(), vt.get_vocab()  # read once: 80 ms each for 131072 tokens
    bsurf, vsurf = surface_strings(bt, bvocab), surface_strings(vt, vvocab)
    seconds["surfaces"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    with tqdm(total=2 * len(texts), desc="tokenize", unit="text", disable=not progress, file=sys.stderr) as bar:
        pieces, skip, cut = pieces_of(bt, vt, texts, bar)
    seconds["tokenize"] = time.perf_counter() - t0  # both tokenizers, and cutting the pieces
    t0 = time.perf_counter()
    threads = threads or os.cpu_count() or 1
    vb, vv = len(bsurf), len(vsurf)
    # aligned in chunks (each still multithreaded) so the bar moves; chunk counts are merged exactly.
    # NOTE: each call converts both surface lists (21 ms for 131072 + 32000 tokens), so at most 20 chunks, and
    # one call when no bar is shown.
    n = len(pieces)
    chunk = max(64 * threads, -(-n // 20)) if progress else max(1, n)
    found = []
    with tqdm(total=n, desc="align", unit="piece", disable=not progress, file=sys.stderr) as bar:
        for lo in range(0, n, chunk):
            hi = min(lo + chunk, n)
            found.append(align_pieces(bsurf, vsurf, pieces.slice(lo, hi), threads=threads, backend=backend))
            bar.update(hi - lo)
    pairs, counts = _merge_counts(found, vv)
    seconds["align"] = time.perf_counter() - t0  # DTW and counting (C++), and merging the chunks' counts
    t0 = time.perf_counter()
    same = twins(bt, vt, bsurf, vsurf, vvocab)
    crow, col, val, argmax = rank_candidates(pairs, counts, same, top_k, pair_distances(pairs, bsurf, vsurf))
    seconds["rank"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    vmap = VocabMap(crow, col, val, (vb, vv))
    vmap.argmax = argmax
    corpus_hash = hashlib.sha256("\x00".join(texts).encode()).hexdigest()
    vmap.meta = {
        "v_base": vb,
        "v_value": vv,
        "base_tokenizer_hash": tokenizer_hash(bt, bvocab),
        "value_tokenizer_hash": tokenizer_hash(vt, vvocab),
        "corpus_hash": corpus_hash,
        "top_k": top_k,
    }
    seconds["hash"] = time.perf_counter() - t0  # the tokenizers' and the corpus's hashes (file metadata)
    stats = {
        "texts": len(texts),
        "cut": cut,  # "in context" or, for a tokenizer without offsets, "lines" (then skipped_texts counts lines)
        "pieces": n,
        "forced_cuts": pieces.forced_cuts,
        "skipped_texts": len(skip),
        "aligned_pairs": int(counts.sum()),
        "distinct_pairs": int(pairs.shape[0]),
        "coverage": int((crow[1:] > crow[:-1]).sum()) / vb,
        "aligned_base_tokens": int((argmax >= 0).sum()),
        "seconds": seconds,
    }
    return vmap, stats


MAP_FORMAT = "ivl_fast.VocabMap/1"


def is_map_file(path: str | Path) -> bool:
    """True if ``path`` is a safetensors file written by :func:`save_map` (its metadata says so)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == MAP_FORMAT
    except Exception:  # not safetensors at all, unreadable, a directory...
        return False


def check_map_output(path: str | Path, *, overwrite: bool, flag: str = "path") -> Path:
    """``path`` as a Path if a map may be written there. Refuses a directory (UnsafeOutputError), an existing file
    without ``overwrite`` (FileExistsError) or, with it, one that is not a map (UnsafeOutputError), and a missing
    parent directory (FileNotFoundError). ``flag``: how messages name the destination (a CLI flag)."""
    p = Path(path)
    if p.is_dir():
        raise UnsafeOutputError(f"{flag} {str(p)!r} is a directory; give a file name for the vocabulary map")
    if p.exists() or p.is_symlink():
        if not overwrite:
            raise FileExistsError(
                f"{flag} {str(p)!r} already exists; pass overwrite=True (CLI: --overwrite) to replace a vocabulary map"
            )
        if not is_map_file(p):
            raise UnsafeOutputError(
                f"{flag} {str(p)!r} exists and is not an ivl-fast vocabulary map; refusing to overwrite it"
            )
    if not p.parent.is_dir():
        raise FileNotFoundError(f"{flag} {str(p)!r}: the directory {str(p.parent)!r} does not exist")
    return p


def save_map(vmap, path: str | Path, *, overwrite: bool = False) -> None:
    """Write the map as safetensors (CSR + ELL + metadata). An existing file is replaced only with
    ``overwrite=True`` and only if it is itself a map; the write goes through a temp file and a rename."""
    from safetensors.torch import save_file

    p = check_map_output(path, overwrite=overwrite)
    idx, w = vmap.ell()
    tensors = {"crow": vmap.crow, "col": vmap.col, "val": vmap.val, "ell_idx": idx, "ell_w": w}
    if getattr(vmap, "argmax", None) is not None:  # the authors' argmax map from the same counts (evaluation)
        tensors["argmax"] = vmap.argmax
    meta = {k: str(v) for k, v in (getattr(vmap, "meta", {}) or {}).items()}
    meta.update({"format": MAP_FORMAT, "shape": json.dumps(list(vmap.shape))})
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    replace_file_atomically(p, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def load_map(path: str | Path, *, base_tokenizer=None, value_tokenizer=None):
    """Read a map written by :func:`save_map`; a missing file raises FileNotFoundError, and a file that is not a
    map, is damaged, or was built for other tokenizers than ``base_tokenizer`` / ``value_tokenizer`` (when
    given: objects or directories, compared by :func:`tokenizer_hash`) raises ValueError naming it."""
    from safetensors import safe_open

    from . import VocabMap

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"vocab map {str(p)!r} does not exist")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != MAP_FORMAT:
                raise ValueError(f"{p} is not an ivl-fast vocabulary map (format {meta.get('format')!r})")
            t = {k: f.get_tensor(k) for k in f.keys()}
    except ValueError:
        raise
    except Exception as e:  # safetensors' own error type differs between versions
        raise ValueError(f"vocab map {str(p)!r} is not a readable safetensors file ({e})") from e
    missing = {"crow", "col", "val", "ell_idx", "ell_w"} - set(t)
    if missing:
        raise ValueError(f"vocab map {str(p)!r} is damaged: tensors {sorted(missing)} are missing")
    try:
        shape = tuple(int(x) for x in json.loads(meta["shape"]))
        if len(shape) != 2:
            raise ValueError
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"vocab map {str(p)!r} is damaged: metadata 'shape' is {meta.get('shape')!r}") from e
    try:
        vmap = VocabMap(t["crow"], t["col"], t["val"], shape)
    except ValueError as e:
        raise ValueError(f"vocab map {str(p)!r} is damaged: {e}") from e
    idx, w = t["ell_idx"], t["ell_w"]
    if idx.shape != w.shape or idx.dim() != 2 or idx.shape[0] != shape[1]:
        raise ValueError(f"vocab map {str(p)!r} is damaged: ELL arrays of shape {tuple(idx.shape)}, {tuple(w.shape)}")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= shape[0]):
        raise ValueError(f"vocab map {str(p)!r} is damaged: ELL indices outside [0, {shape[0]})")
    vmap._ell["cpu"] = (idx.to(torch.int32), w.float())
    vmap.meta = {k: v for k, v in meta.items() if k not in ("format", "shape")}
    if "argmax" in t:
        am = t["argmax"]
        if am.shape != (shape[0],) or (am.numel() and (int(am.min()) < -1 or int(am.max()) >= shape[1])):
            raise ValueError(f"vocab map {str(p)!r} is damaged: its argmax baseline has shape {tuple(am.shape)}")
        vmap.argmax = am.to(torch.int64)
    for side, tok in (("base", base_tokenizer), ("value", value_tokenizer)):
        if tok is None:
            continue
        got = tokenizer_hash(_tokenizer(tok))
        want = vmap.meta.get(f"{side}_tokenizer_hash")
        if want and got != want:
            raise ValueError(
                f"vocab map {p} was built for another {side} tokenizer (hash {want[:12]}..., given {got[:12]}...)"
            )
    return vmap


def _top1(crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
    """[V_base] int64: each row's heaviest value token (the first of equals), -1 for an empty row."""
    vb = crow.numel() - 1
    counts = crow[1:] - crow[:-1]
    rows = torch.repeat_interleave(torch.arange(vb), counts)
    order = torch.argsort(-val.double(), stable=True)
    order = order[torch.argsort(rows[order], stable=True)]
    first = crow[:-1][counts > 0]
    top = torch.full((vb,), -1, dtype=torch.int64)
    top[rows[order][first]] = col[order][first]
    return top


def _overlap(top: torch.Tensor, ids_b: list[list[int]], ids_v: list[list[int]]) -> float:
    """Base tokens of each text mapped through ``top`` (unmapped ones dropped), as a multiset against the value
    tokenizer's own tokens of the same text: the intersection's share of the value tokens."""
    top = top.tolist()
    inter = total = 0
    for b_ids, v_ids in zip(ids_b, ids_v, strict=True):
        mapped = Counter(y for y in (top[x] for x in b_ids) if y >= 0)
        inter += sum((mapped & Counter(v_ids)).values())
        total += len(v_ids)
    return inter / total if total else 0.0


def _weighted_overlap(vmap, ids_b: list[list[int]], ids_v: list[list[int]]) -> float:
    """As :func:`_overlap` with each base token spread over its row's value tokens by the weights: per text, the
    mass each value token receives, capped at how often the value tokenizer used it."""
    crow, col, val = vmap.crow.tolist(), vmap.col.tolist(), vmap.val.tolist()
    inter = total = 0.0
    for b_ids, v_ids in zip(ids_b, ids_v, strict=True):
        mass: dict[int, float] = {}
        for x in b_ids:
            for k in range(crow[x], crow[x + 1]):
                mass[col[k]] = mass.get(col[k], 0.0) + val[k]
        inter += sum(min(m, c) for y, c in Counter(v_ids).items() if (m := mass.get(y)))
        total += len(v_ids)
    return inter / total if total else 0.0


def evaluate_map(vmap, base_tokenizer, value_tokenizer, texts: list[str]) -> dict:
    """Held-out quality of a map: ``{"overlap_ratio", "overlap_ratio_weighted", "coverage", "texts", "pieces",
    "skipped_texts", "argmax_baseline"}``.

    overlap_ratio: each base token of held-out text mapped to its top value token, compared (as multisets, per
    piece) with the value tokenizer's own tokenization, as a share of the value tokens; overlap_ratio_weighted:
    the same with each base token spread over its row by the weights (the top-K mass); coverage: the share of base
    tokens with a mapping; texts: how many were given; pieces: how many multisets were compared. argmax_baseline:
    ``{"overlap_ratio", "coverage"}`` of the authors' map (argmax of the alignment counts per base token) built
    from the same corpus, when the map carries it (``vmap.argmax``: maps built by ivl-fast do), else None.

    The pieces are cut in context as the build cuts them (:func:`pieces_of`): each text tokenized whole, as running
    text, and compared piece by piece, pieces cut where both tokenizations have a boundary about every
    ``EVAL_PIECE_CHARS`` characters (under twice that), so a long text is not one loose multiset. Texts a tokenizer
    fails on are left out (``skipped_texts``)."""
    bt, vt = _tokenizer(base_tokenizer), _tokenizer(value_tokenizer)
    pieces, skip, _ = pieces_of(bt, vt, [t for t in texts if t], max_chars=EVAL_PIECE_CHARS)
    ids_b, ids_v = pieces.lists()
    rows = vmap.crow[1:] > vmap.crow[:-1]
    report = {
        "overlap_ratio": _overlap(_top1(vmap.crow, vmap.col, vmap.val), ids_b, ids_v),
        "overlap_ratio_weighted": _weighted_overlap(vmap, ids_b, ids_v),
        "coverage": int(rows.sum()) / vmap.v_base,
        "texts": len(texts),
        "pieces": len(pieces),
        "skipped_texts": len(skip),
        "argmax_baseline": None,
    }
    argmax = getattr(vmap, "argmax", None)
    if argmax is not None:
        report["argmax_baseline"] = {
            "overlap_ratio": _overlap(argmax, ids_b, ids_v),
            "coverage": int((argmax >= 0).sum()) / vmap.v_base,
        }
    return report
