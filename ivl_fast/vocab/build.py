"""Building, saving, loading and evaluating base->value vocabulary maps (MinED/DTW, as in FuseLLM)."""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path

import torch

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


def encode_all(tokenizer, texts: list[str]) -> tuple[list[list[int]], list[int]]:
    """Token ids of each text (no special tokens); texts the tokenizer cannot encode are reported, not fatal."""
    seqs, failed = [], []
    for i, t in enumerate(texts):
        try:
            seqs.append(list(tokenizer(t, add_special_tokens=False)["input_ids"]))
        except Exception:  # a tokenizer error on one text must not lose the whole build
            seqs.append(None)
            failed.append(i)
    return seqs, failed


def split_corpus(texts: list[str], max_chars: int = 256) -> list[str]:
    """Lines, and long lines cut at whitespace into pieces of <= max_chars: DTW is quadratic in a piece's
    length, so bounded pieces keep the build linear in the corpus size."""
    out = []
    for text in texts:
        for line in text.splitlines():
            while len(line) > max_chars:
                cut = line.rfind(" ", 0, max_chars)
                cut = cut if cut > max_chars // 2 else max_chars
                out.append(line[:cut])
                line = line[cut:]
            if line.strip():
                out.append(line)
    return out


def build_map(
    base_tokenizer,
    value_tokenizer,
    texts: list[str],
    *,
    top_k: int = 3,
    threads: int | None = None,
    backend: str = "auto",
):
    """-> (VocabMap, stats). See VocabMap.build."""
    from . import VocabMap

    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}")
    texts = split_corpus([t for t in texts if t and t.strip()])
    if not texts:
        raise ValueError("the corpus is empty: no text to align")
    bt, vt = _tokenizer(base_tokenizer), _tokenizer(value_tokenizer)
    bsurf, vsurf = surface_strings(bt), surface_strings(vt)
    bseqs, bfail = encode_all(bt, texts)
    vseqs, vfail = encode_all(vt, texts)
    skip = set(bfail) | set(vfail)
    pairs_b = [s for i, s in enumerate(bseqs) if i not in skip]
    pairs_v = [s for i, s in enumerate(vseqs) if i not in skip]
    threads = threads or os.cpu_count() or 1
    pairs, counts = align_counts(bsurf, vsurf, pairs_b, pairs_v, threads=threads, backend=backend)

    vb, vv = len(bsurf), len(vsurf)
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


def save_map(vmap, path: str | Path) -> None:
    from safetensors.torch import save_file

    idx, w = vmap.ell()
    tensors = {"crow": vmap.crow, "col": vmap.col, "val": vmap.val, "ell_idx": idx, "ell_w": w}
    meta = {k: str(v) for k, v in (getattr(vmap, "meta", {}) or {}).items()}
    meta.update({"format": "ivl_fast.VocabMap/1", "shape": json.dumps(list(vmap.shape))})
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)


def load_map(path: str | Path, *, base_tokenizer=None, value_tokenizer=None):
    from safetensors import safe_open

    from . import VocabMap

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"vocab map {str(p)!r} does not exist")
    with safe_open(str(p), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != "ivl_fast.VocabMap/1":
            raise ValueError(f"{p} is not an ivl-fast vocabulary map (format {meta.get('format')!r})")
        t = {k: f.get_tensor(k) for k in f.keys()}
    shape = tuple(json.loads(meta["shape"]))
    vmap = VocabMap(t["crow"], t["col"], t["val"], shape)
    vmap._ell["cpu"] = (t["ell_idx"], t["ell_w"])
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
    """Overlap ratio: map each base token of held-out text to its top value token and compare (as multisets)
    with the value tokenizer's own tokenization; plus coverage (share of base tokens with a mapping)."""
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
