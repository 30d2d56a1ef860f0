"""Prompt packing: token ids in any accepted form -> a left-padded [B, T] batch and its mask.

One function, :func:`left_pad`, packs rows for every model of a run (the prompt in the sampled vocabulary, and the
base's own re-tokenization across vocabularies). Left padding keeps every row's last token in the last column,
so one prefill gives every row's next-token logits.
"""

from __future__ import annotations

import torch

from ..checks import is_int

_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """rows of token ids -> (ids [B, T] int64 left-padded with ``pad_id``, mask [B, T] bool), on the CPU."""
    t = max(len(r) for r in rows)
    ids = torch.full((len(rows), t), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(rows), t), dtype=torch.bool)
    for i, r in enumerate(rows):
        if r:
            ids[i, t - len(r) :] = torch.tensor(r, dtype=torch.int64)
            mask[i, t - len(r) :] = True
    return ids, mask


def pack_prompts(input_ids, attention_mask, pad_id: int, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids``: [B, T] or [T] tensor (with ``attention_mask`` for padded batches; left, right or any padding),
    or a list of token-id lists of different lengths -> left-padded (ids [B, T] int64, mask [B, T] bool) on the
    CPU. Every row needs a token; every id must be in [0, vocab_size)."""
    if isinstance(input_ids, list | tuple):
        rows = (
            [list(r) for r in input_ids] if input_ids and isinstance(input_ids[0], list | tuple) else [list(input_ids)]
        )
        if attention_mask is not None:
            raise ValueError("attention_mask is only accepted with a tensor input_ids (lists carry their lengths)")
        for i, r in enumerate(rows):
            if not r:
                raise ValueError(f"prompt {i} is empty: every row needs at least one token")
            bad = next((x for x in r if not is_int(x)), None)
            if bad is not None:
                raise ValueError(f"input_ids must hold integer token ids; prompt {i} holds {bad!r}")
        if not rows:
            raise ValueError("input_ids is empty (no prompts)")
        ids, mask = left_pad(rows, pad_id)
    elif isinstance(input_ids, torch.Tensor):
        ids = input_ids
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T] or [T], got shape {tuple(input_ids.shape)}")
        if ids.dtype not in _INT_DTYPES:
            raise ValueError(f"input_ids must hold integer token ids, got dtype {ids.dtype}")
        if ids.shape[1] == 0 or ids.shape[0] == 0:
            raise ValueError(f"input_ids is empty (shape {tuple(ids.shape)})")
        ids = ids.long().cpu()
        if attention_mask is None:
            mask = torch.ones_like(ids, dtype=torch.bool)
        else:
            mask = torch.as_tensor(attention_mask)
            mask = mask.reshape(ids.shape if mask.dim() == 2 else (1, -1))
            if mask.shape != ids.shape:
                raise ValueError(f"attention_mask shape {tuple(mask.shape)} != input_ids shape {tuple(ids.shape)}")
            mask = mask.cpu().bool()
        empty = (~mask.any(1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"prompt {empty[0]} is empty: its attention_mask has no 1s")
        if not bool((mask.long().diff(dim=1) >= 0).all()):  # re-pack right/other padding to the left, in order
            ids, mask = left_pad([ids[i][mask[i]].tolist() for i in range(ids.shape[0])], pad_id)
    else:
        raise TypeError(f"input_ids must be a tensor or a list of token-id lists, got {type(input_ids).__name__}")
    real = ids[mask]
    if real.numel() and (int(real.min()) < 0 or int(real.max()) >= vocab_size):
        raise ValueError(
            f"input_ids holds token ids outside [0, {vocab_size}) (min {int(real.min())}, max {int(real.max())})"
        )
    return ids, mask


def repeat_prompts(ids: torch.Tensor, mask: torch.Tensor, texts: list[str] | None, n: int):
    """Each prompt ``n`` times, its copies adjacent (transformers' layout for num_return_sequences):
    rows [a, b] -> [a, a, b, b]."""
    if n == 1:
        return ids, mask, texts
    texts = None if texts is None else [t for t in texts for _ in range(n)]
    return ids.repeat_interleave(n, dim=0), mask.repeat_interleave(n, dim=0), texts
