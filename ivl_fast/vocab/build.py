"""Building, saving, loading and evaluating base->value vocabulary maps (MinED/DTW, as in FuseLLM)."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections import Counter
from pathlib import Path

import torch

from ..safe_output import UnsafeOutputError, replace_file_atomically
from .align import align_counts, surface_strings


def _tokenizer(t):
    if isinstance(t, str | Path):
        from ..chat import load_tokenizer

        return load_tokenizer(t)
    return t


def tokenizer_hash(tokenizer) -> str:
    """Content hash of a tokenizer's vocabulary (token -> id), independent of where it was loaded from."""
    vocab = tokenizer.get_vocab()
    if not vocab:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has an empty vocabulary")
    h = hashlib.sha256()
    for tok, i in sorted(vocab.items(), key=lambda kv: kv[1]):
        h.update(f"{i}\t{tok}\n".encode("utf-8", errors="surrogatepass"))
    return h.hexdigest()


def encode_all(tokenizer, texts: list[str], bar=None) -> tuple[list[list[int]], list[int]]:
    """(ids, failed): the token ids of each text (no special tokens), None for a text the tokenizer cannot
    encode, and those texts' indices (reported, not fatal). ``bar``: a progress bar advanced once per text."""
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
    line has no space past half of it); blank pieces are dropped. DTW is quadratic in a piece's length, so
    bounded pieces keep the build linear in the corpus size."""
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


def _merge_counts(found: list[tuple[torch.Tensor, torch.Tensor]], v_value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum the (pairs [M, 2], counts [M]) of several chunks -> one sorted list of distinct pairs."""
    if not found:
        return torch.zeros((0, 2), dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    pairs = torch.cat([p.reshape(-1, 2) for p, _ in found])
    counts = torch.cat([c for _, c in found])
    keys, inverse = torch.unique(pairs[:, 0] * v_value + pairs[:, 1], sorted=True, return_inverse=True)
    total = torch.zeros(keys.numel(), dtype=torch.int64).index_add_(0, inverse, counts)
    return torch.stack([keys // v_value, keys % v_value], dim=1), total


def build_map(
    base_tokenizer,
    value_tokenizer,
    texts: list[str],
    *,
    top_k: int = 3,
    threads: int | None = None,
    backend: str = "auto",
    progress: bool = False,
):
    """-> (VocabMap, stats). See VocabMap.build. ``progress``: tqdm bars on stderr (tokenizing, aligning)."""
    from tqdm.auto import tqdm

    from . import VocabMap

    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}")
    texts = split_corpus([t for t in texts if t and t.strip()])
    if not texts:
        raise ValueError("the corpus is empty: no text to align")
    bt, vt = _tokenizer(base_tokenizer), _tokenizer(value_tokenizer)
    bsurf, vsurf = surface_strings(bt), surface_strings(vt)
    with tqdm(total=2 * len(texts), desc="tokenize", unit="text", disable=not progress, file=sys.stderr) as bar:
        bseqs, bfail = encode_all(bt, texts, bar)
        vseqs, vfail = encode_all(vt, texts, bar)
    skip = set(bfail) | set(vfail)
    pairs_b = [s for i, s in enumerate(bseqs) if i not in skip]
    pairs_v = [s for i, s in enumerate(vseqs) if i not in skip]
    threads = threads or os.cpu_count() or 1
    vb, vv = len(bsurf), len(vsurf)
    # aligned in chunks (each still multithreaded) so the bar moves; chunk counts are merged exactly.
    # NOTE: each call converts both surface lists (21 ms for 131072 + 32000 tokens), so at most 20 chunks, and
    # one call when no bar is shown.
    chunk = max(64 * threads, -(-len(pairs_b) // 20)) if progress else max(1, len(pairs_b))
    found = []
    with tqdm(total=len(pairs_b), desc="align", unit="text", disable=not progress, file=sys.stderr) as bar:
        for lo in range(0, len(pairs_b), chunk):
            hi = min(lo + chunk, len(pairs_b))
            found.append(align_counts(bsurf, vsurf, pairs_b[lo:hi], pairs_v[lo:hi], threads=threads, backend=backend))
            bar.update(hi - lo)
    pairs, counts = _merge_counts(found, vv)

    by_surface = {}
    for i, s in enumerate(vsurf):
        if s and s not in by_surface:
            by_surface[s] = i
    # per base token: candidates ranked by (identical string first, count, lower id), top-K, normalised
    rows: dict[int, list[tuple[int, int]]] = {}
    for (b, v), c in zip(pairs.tolist(), counts.tolist(), strict=True):
        rows.setdefault(b, []).append((v, c))
    crow, col, val = [0], [], []
    mapped = 0
    for b in range(vb):
        cand = rows.get(b, [])
        same = by_surface.get(bsurf[b])
        if same is not None and all(v != same for v, _ in cand):
            # an identical value token the alignment never paired: preferred, with the row's top count
            cand = cand + [(same, max((c for _, c in cand), default=1))]
        cand.sort(key=lambda vc: (vc[0] != same, -vc[1], vc[0]))
        cand = cand[:top_k]
        total = sum(c for _, c in cand)
        if cand:
            mapped += 1
            for v, c in cand:
                col.append(v)
                val.append(c / total)
        crow.append(len(col))
    vmap = VocabMap(torch.tensor(crow), torch.tensor(col, dtype=torch.int64), torch.tensor(val), (vb, vv))
    corpus_hash = hashlib.sha256("\x00".join(texts).encode()).hexdigest()
    vmap.meta = {
        "v_base": vb,
        "v_value": vv,
        "base_tokenizer_hash": tokenizer_hash(bt),
        "value_tokenizer_hash": tokenizer_hash(vt),
        "corpus_hash": corpus_hash,
        "top_k": top_k,
    }
    stats = {
        "texts": len(texts),
        "skipped_texts": len(skip),
        "aligned_pairs": int(counts.sum()),
        "distinct_pairs": int(pairs.shape[0]),
        "coverage": mapped / vb,
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


def evaluate_map(vmap, base_tokenizer, value_tokenizer, texts: list[str]) -> dict:
    """``{"overlap_ratio", "coverage", "texts"}``. Overlap ratio: map each base token of held-out text to its
    top value token and compare (as multisets) with the value tokenizer's own tokenization, as a share of the
    value tokens; coverage: the share of base tokens with a mapping; texts: how many were given."""
    bt, vt = _tokenizer(base_tokenizer), _tokenizer(value_tokenizer)
    top = {}
    crow, col, val = vmap.crow.tolist(), vmap.col.tolist(), vmap.val.tolist()
    for b in range(vmap.v_base):
        lo, hi = crow[b], crow[b + 1]
        if hi > lo:
            top[b] = col[lo + max(range(hi - lo), key=lambda k: val[lo + k])]
    inter = total = 0
    for t in texts:
        b_ids = bt(t, add_special_tokens=False)["input_ids"]
        v_ids = vt(t, add_special_tokens=False)["input_ids"]
        mapped = Counter(top[x] for x in b_ids if x in top)
        own = Counter(v_ids)
        inter += sum((mapped & own).values())
        total += len(v_ids)
    coverage = sum(1 for b in range(vmap.v_base) if crow[b + 1] > crow[b]) / vmap.v_base
    return {"overlap_ratio": inter / total if total else 0.0, "coverage": coverage, "texts": len(texts)}
