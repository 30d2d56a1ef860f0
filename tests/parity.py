"""The lean engine against transformers' own model: the comparison every family meets (tests/test_models.py,
tests/test_model_families.py). Prompts of different lengths batched with left padding; the full-sequence logits,
the prefill logits and 24 decode steps against transformers with its own KV cache. Tolerance: max |diff| <= tol x
the largest |logit|."""

from __future__ import annotations

import torch

from ivl_fast.models.hf_adapter import cache_kwarg

LENGTHS = (9, 5, 2)
STEPS = 24
# prompts of the family pair tests (tests/test_model_families.py, its torchrun worker): the first crosses the
# windows of 6 and, with 14 new tokens, a longrope switch at 16
FAMILY_PROMPTS = [[1, 17, 42, 99, 7, 8, 9, 10, 11], [1, 5, 300], [1, 200, 201, 202, 203, 204]]


def batch(vocab: int, lengths=LENGTHS, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    t = max(lengths)
    ids = torch.full((len(lengths), t), 3, dtype=torch.int64)
    mask = torch.zeros((len(lengths), t), dtype=torch.int64)
    for i, n in enumerate(lengths):
        ids[i, t - n :] = torch.randint(4, vocab, (n,), generator=g)
        mask[i, t - n :] = 1
    return ids, mask


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def compare_with_hf(hf, lean, *, tol: float, steps: int = STEPS):
    """Prefill + teacher-forced decode of lean vs transformers (its own cache). Returns the worst rel. error."""
    vocab = hf.config.vocab_size
    ids, mask = batch(vocab)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    worst = 0.0
    # full-sequence logits at the real (unpadded) positions
    full = lean(ids, attention_mask=mask)
    real = mask.bool()
    worst = max(worst, rel_err(full[real], ref.logits[real]))
    lean.allocate(ids.shape[0], ids.shape[1] + steps)
    z = lean.prefill(ids, mask)
    worst = max(worst, rel_err(z, ref.logits[:, -1]))
    cache = cache_kwarg(hf)  # `cache` from transformers 5.25, `past_key_values` before
    past, am, lens = ref[cache], mask, mask.sum(-1)
    nxt = ref.logits[:, -1].argmax(-1)
    for _ in range(steps):
        am = torch.cat([am, torch.ones_like(am[:, :1])], dim=1)
        with torch.no_grad():
            out = hf(
                input_ids=nxt[:, None],
                attention_mask=am,
                position_ids=lens[:, None],
                use_cache=True,
                **{cache: past},
            )
        z = lean.decode(nxt)
        worst = max(worst, rel_err(z, out.logits[:, -1]))
        past, lens, nxt = out[cache], lens + 1, out.logits[:, -1].argmax(-1)
    assert worst <= tol, f"lean vs transformers: max relative logit error {worst:.3g} > {tol}"
    return worst
