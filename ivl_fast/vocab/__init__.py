"""Sparse base->value vocabulary maps.

``VocabMap`` holds W [V_base, V_value] as CSR (rows = base tokens) and derives the orientation the fused
sampling kernel reads: ELL by value token, ``idx`` [V_value, K] (base ids) and ``w`` [V_value, K] (weights,
0 for padding), a fixed-width gather.

The base's logits cross into the value vocabulary as a distribution: ``z_value_space = log(softmax(z_base) @ W)``
(rows of W sum to 1, so this is the base's next-token distribution pushed through the map), floored at
``log(EMPTY_PROB)`` for value tokens no base token maps to. Mapping the raw logits instead (``z_base @ W``) gives
those unmapped tokens logit 0, above most mapped ones, and scored 0.00 on the demo's cross-vocabulary row (issue
#19). ``VocabMap.build`` aligns two tokenizations of the same texts by DTW on an edit-distance cost (MinED, C++ in
``ivl_fast._C`` with a Python fallback), each text tokenized whole and cut where both tokenizations have a
boundary (``ivl_fast.vocab.segment``), counts aligned pairs and keeps the top-K value tokens per base token by
count (weights summing to 1; ties go to the nearer surface in edit distance, then the identical one, which
also maps base tokens the corpus never aligned).
``save``/``load`` use safetensors with metadata (format tag, shape, vocab sizes, tokenizer content hashes, corpus
hash, K); loading checks the tokenizers when given.
"""

from __future__ import annotations

import warnings

import torch

# value tokens kept per base token by default: the best K of the demo's cross-vocabulary row (bench/vocab_k_sweep.py)
DEFAULT_TOP_K = 2

# probability floor of a value token no base token maps to, in VocabMap.apply (and the fused kernel's constant)
EMPTY_PROB = 1e-30


class VocabMap:
    """W [V_base, V_value] in CSR: ``crow`` [V_base + 1], ``col`` (value ids) and ``val`` (weights) of its nonzeros.

    ``shape`` = (V_base, V_value) (also :attr:`v_base`, :attr:`v_value`); ``meta``: the file metadata (what
    :meth:`build` recorded, or what :meth:`load` read); ``stats``: only on a map from :meth:`build` (texts,
    skipped_texts, aligned_pairs, distinct_pairs, coverage, aligned_base_tokens); ``argmax`` [V_base] int64 or
    None: the authors' map (the most aligned value token per base token, -1 where none) from the same alignment
    counts, which :meth:`evaluate` reports beside the map (built maps and their files carry it).
    """

    def __init__(self, crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor, shape: tuple[int, int]):
        vb, vv = shape
        if crow.dim() != 1 or crow.numel() != vb + 1:
            raise ValueError(f"crow must have V_base + 1 = {vb + 1} entries, got shape {tuple(crow.shape)}")
        if col.shape != val.shape or col.dim() != 1:
            raise ValueError(f"col and val must be 1-D of one length, got {tuple(col.shape)} and {tuple(val.shape)}")
        if col.numel() and (int(col.min()) < 0 or int(col.max()) >= vv):
            raise ValueError(f"col holds value ids outside [0, {vv})")
        self.crow, self.col, self.val = crow.long(), col.long(), val.float()
        self.shape = (int(vb), int(vv))
        self._ell: dict = {}
        self._pushed: dict = {}  # (device, dtype) -> W^T CSR (see _pushing)
        self.meta: dict = {}
        self.argmax: torch.Tensor | None = None

    @property
    def v_base(self) -> int:
        return self.shape[0]

    @property
    def v_value(self) -> int:
        return self.shape[1]

    @classmethod
    def from_dense(cls, w: torch.Tensor) -> VocabMap:
        """W [V_base, V_value] dense -> CSR (zeros dropped)."""
        if w.dim() != 2:
            raise ValueError(f"W must be 2-D [V_base, V_value], got shape {tuple(w.shape)}")
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore")
            sp = w.detach().float().cpu().to_sparse_csr()
        return cls(sp.crow_indices(), sp.col_indices(), sp.values(), tuple(w.shape))

    def to_torch_sparse(self) -> torch.Tensor:
        """torch sparse CSR [V_base, V_value]."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.sparse_csr_tensor(self.crow, self.col, self.val, size=self.shape, check_invariants=False)

    def to_dense(self) -> torch.Tensor:
        return self.to_torch_sparse().to_dense()

    def ell(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(idx int32 [V_value, K], w fp32 [V_value, K]) grouped by value token; K = max base tokens per value."""
        key = str(device)
        if key not in self._ell:
            rows = torch.repeat_interleave(torch.arange(self.v_base), self.crow.diff())  # base id of each nnz
            order = torch.argsort(self.col, stable=True)
            cols, base_ids, vals = self.col[order], rows[order], self.val[order]
            counts = torch.bincount(cols, minlength=self.v_value)
            k = max(1, int(counts.max()) if counts.numel() else 1)
            starts = torch.cumsum(counts, 0) - counts
            slot = torch.arange(cols.numel()) - starts[cols]
            idx = torch.zeros(self.v_value, k, dtype=torch.int32)
            w = torch.zeros(self.v_value, k, dtype=torch.float32)
            idx[cols, slot] = base_ids.int()
            w[cols, slot] = vals
            self._ell[key] = (idx.to(device), w.to(device))
        return self._ell[key]

    def apply(self, base_logits: torch.Tensor) -> torch.Tensor:
        """Reference mapping: [B, V_base] logits -> [B, V_value] = log(max(softmax(base_logits) @ W, EMPTY_PROB))
        (fp32, or float64 for float64 logits): the base's distribution pushed through the map."""
        if base_logits.shape[-1] != self.v_base:
            raise ValueError(f"base logits have {base_logits.shape[-1]} entries but the map expects {self.v_base}")
        z = base_logits.double() if base_logits.dtype == torch.float64 else base_logits.float()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p = (self._pushing(z.device, z.dtype) @ torch.softmax(z, dim=-1).t()).t()
        return torch.log(p.clamp_min(EMPTY_PROB))

    def _pushing(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """W^T [V_value, V_base] as a torch sparse CSR tensor on ``device`` in ``dtype``: :meth:`apply`'s operand,
        made once per (device, dtype) (a map's tensors are not changed after it is made). Made per call it cost 8x
        the product (19 ms against 2.3 ms per [8, 131072] call on 2 CPU cores: bench/test_map_apply.py) and, on a
        GPU, a copy of the map from the host each step."""
        key = (str(device), dtype)
        if key not in self._pushed:  # a plain tensor even when made under inference mode: later calls may need grads
            with warnings.catch_warnings(), torch.inference_mode(False):
                warnings.simplefilter("ignore")
                self._pushed[key] = self.to_torch_sparse().to(dtype=dtype).t().to_sparse_csr().to(device)
        return self._pushed[key]

    # ------------------------------------------------------------------ building and files
    @classmethod
    def build(
        cls,
        base_tokenizer,
        value_tokenizer,
        texts,
        *,
        top_k: int = DEFAULT_TOP_K,
        threads=None,
        backend="auto",
        progress=False,
    ):
        """Align ``texts`` with both tokenizers (objects or directories) and return the map (stats in ``.stats``).
        ``top_k``: value tokens kept per base token (1: the authors' argmax map, plus an identical-surface entry
        for base tokens the corpus never aligned); ``threads``: alignment threads (default: every core);
        ``backend``: "cpp" (``ivl_fast._C``), "python" or "auto" (cpp when built); ``progress=True`` shows tqdm
        bars on stderr."""
        from .build import build_map

        vmap, stats = build_map(
            base_tokenizer,
            value_tokenizer,
            list(texts),
            top_k=top_k,
            threads=threads,
            backend=backend,
            progress=progress,
        )
        vmap.stats = stats
        return vmap

    def save(self, path, *, overwrite: bool = False) -> None:
        """Write a safetensors file. An existing file is replaced only with ``overwrite=True``, and only if it
        is an ivl-fast map itself (anything else is refused, untouched)."""
        from .build import save_map

        save_map(self, path, overwrite=overwrite)

    @classmethod
    def load(cls, path, *, base_tokenizer=None, value_tokenizer=None) -> VocabMap:
        """Read a file written by :meth:`save`; the tokenizers given (objects or directories) must be the ones it
        was built for (ValueError otherwise, as for a file that is not a map or is damaged)."""
        from .build import load_map

        return load_map(path, base_tokenizer=base_tokenizer, value_tokenizer=value_tokenizer)

    def evaluate(self, base_tokenizer, value_tokenizer, texts) -> dict:
        """Held-out quality on ``texts``: ``{"overlap_ratio", "overlap_ratio_weighted", "coverage", "texts", "pieces",
        "skipped_texts", "argmax_baseline": {"overlap_ratio", "coverage"} or None}``, compared piece by piece in
        running text (``ivl_fast.vocab.build.evaluate_map``)."""
        from .build import evaluate_map

        return evaluate_map(self, base_tokenizer, value_tokenizer, list(texts))


__all__ = ["VocabMap"]
