"""Starting decode loops: a generate() call's batch, and graph capture ahead of the first requests.

The decoder facade resolves options and packs prompts; these functions pick the loop's shape (eager rows or a
graph batch bucket, KV capacity, the cross-vocabulary re-tokenizer, stop strings) and prefill it.
"""

from __future__ import annotations

import torch

from ..checks import check_int
from ..graphs import batch_bucket, kv_bucket
from .cross_vocab import Retokenizer, prompt_text
from .graph_cache import GraphCache
from .loop import DecodeLoop
from .model_set import ModelSet
from .options import GenerationOptions
from .speculative_loop import SpeculativeLoop
from .stops import StopStringScanner


def kv_capacity(models: ModelSet, need: int, kv_block: int) -> int:
    """KV cache columns for a run needing ``need``: rounded up like the KV buckets (so later, longer calls reuse
    the cache and its graphs), within the context."""
    return kv_bucket(need, models.max_context, kv_block)


def start_generation(
    models: ModelSet,
    opts: GenerationOptions,
    prompt: torch.Tensor,
    mask: torch.Tensor,
    *,
    graph_cache: GraphCache | None,
    kv_block: int,
    sync_every: int,
    tokenizer=None,
    base_tokenizer=None,
    same_tokenizers: bool = False,
    texts: list[str] | None = None,
) -> DecodeLoop:
    """The prefilled loop of left-padded prompts [B, T] (CPU; moved to the models' device here): its first tokens
    are emitted. ``graph_cache`` None: eager. Across vocabularies the base reads ``texts`` (default: each prompt's
    :func:`~.cross_vocab.prompt_text`)."""
    b, t = prompt.shape
    n = opts.max_new_tokens
    if t + n > models.max_context:
        raise ValueError(
            f"prompt length {t} + max_new_tokens {n} = {t + n} exceeds the model context of {models.max_context} tokens"
        )
    retok = None
    if models.cross_vocab:
        rows = [r[m].tolist() for r, m in zip(prompt, mask, strict=True)]
        if texts is None:
            texts = [prompt_text(tokenizer, r) for r in rows]
        retok = Retokenizer(tokenizer, base_tokenizer, rows, texts, same_tokenizers, models.base.max_context)
    loop = DecodeLoop(
        models,
        opts,
        slots=batch_bucket(b) if graph_cache is not None else b,
        capacity=kv_capacity(models, t + n, kv_block) if retok is None else t + n,
        out_cols=n,
        sync_every=sync_every,
        graph_cache=graph_cache,
        stops=StopStringScanner(tokenizer, opts.stop_strings) if opts.stop_strings else None,
        retokenizer=retok,
    )
    loop.start(prompt.to(models.device), mask.to(models.device))
    return loop


def capture_buckets(
    models: ModelSet,
    opts: GenerationOptions,
    graph_cache: GraphCache,
    batch_sizes,
    max_seq_len: int,
    sync_every: int,
    continuous: bool = False,
) -> int:
    """Capture, for the bucket of each of ``batch_sizes``, the graphs of every KV bucket a run of up to
    ``max_seq_len`` tokens reaches with ``opts`` (a generate() run's last step attends to max_seq_len - 1 columns,
    a continuous batch's finished rows to max_seq_len); ``continuous``: the graphs of :func:`open_slots` batches.
    -> graphs captured now."""
    kv_block = graph_cache.settings.kv_block
    capacity = kv_capacity(models, max_seq_len, kv_block)
    captured = 0
    # largest bucket first: its KV store serves the smaller buckets as row views (no reallocation after)
    for b in sorted({batch_bucket(int(x)) for x in batch_sizes}, reverse=True):
        if continuous:
            loop = open_slots(models, opts, graph_cache, b, max_seq_len, kv_block, sync_every)
        else:
            prompt = torch.full((b, 1), opts.pad_token_id, dtype=torch.int64, device=models.device)
            loop = DecodeLoop(
                models,
                opts,
                slots=b,
                capacity=capacity,
                out_cols=max_seq_len - 1,
                sync_every=sync_every,
                graph_cache=graph_cache,
            )
            loop.start(prompt, torch.ones_like(prompt, dtype=torch.bool))
        top = max_seq_len + 1 if continuous else max_seq_len
        with torch.inference_mode(), loop.on_device():
            for kv in sorted({kv_bucket(need, capacity, kv_block) for need in range(2, top)}):
                loop.graphs(kv)
        captured += loop.captures
    return captured


def open_slots(
    models: ModelSet,
    opts: GenerationOptions,
    graph_cache,
    slots: int,
    max_seq_len: int,
    kv_block: int,
    sync_every: int,
    per_request: bool = False,
    top_logprobs: int = 0,
    components: int = 0,
    tokenizer=None,
    base_tokenizer=None,
    same_tokenizers: bool = False,
) -> DecodeLoop:
    """An empty persistent batch of ``slots`` requests of up to ``max_seq_len`` tokens each (prompt + new);
    ``per_request``: each request brings its own sampling values and seed; ``top_logprobs``: the most top
    alternatives a request may ask for (:class:`DecodeLoop`). Across vocabularies each admitted request's base
    context is re-derived from its text after every step, as in generate() (the tokenizers are needed)."""
    if opts.stop_strings is not None or opts.num_return_sequences != 1:
        raise ValueError("open_batch supports neither stop_strings nor num_return_sequences yet")
    check_int(slots, "slots", 1)
    top = models.max_context
    check_int(max_seq_len, "max_seq_len", 2, top)
    retok = None
    if models.cross_vocab:
        retok = Retokenizer.slots(tokenizer, base_tokenizer, slots, same_tokenizers, models.base.max_context)
        graph_cache = None  # cross-vocabulary runs decode eagerly
    return DecodeLoop(
        models,
        opts,
        slots=batch_bucket(slots) if graph_cache is not None else slots,
        continuous=True,
        requests=slots,
        max_seq_len=max_seq_len,
        capacity=kv_capacity(models, max_seq_len, kv_block),
        out_cols=max_seq_len - 1,
        sync_every=sync_every,
        graph_cache=graph_cache,
        per_request=per_request,
        top_logprobs=top_logprobs,
        components=components,
        retokenizer=retok,
    )


def start_speculative(
    models: ModelSet,
    draft,
    k: int,
    opts: GenerationOptions,
    prompt: torch.Tensor,
    mask: torch.Tensor,
    *,
    graph_cache: GraphCache | None,
    kv_block: int,
    tokenizer=None,
) -> SpeculativeLoop:
    """The prefilled speculative loop of left-padded prompts [B, T] (its first tokens emitted)."""
    if opts.min_new_tokens or any(opts.record) or opts.return_components:
        raise ValueError(
            "min_new_tokens, output_scores, output_logits and return_components are not supported with a draft "
            "model yet (its rounds warp and accept apart from the decode step); decode without the draft for them"
        )
    b, t = prompt.shape
    n = opts.max_new_tokens
    need = t + n + k + 1  # a round reads up to k + 1 tokens past what a row keeps
    top = min(models.max_context, draft.max_context)
    if need > top:
        raise ValueError(
            f"prompt length {t} + max_new_tokens {n} + num_draft_tokens {k} + 1 = {need} exceeds the model context "
            f"of {top} tokens"
        )
    loop = SpeculativeLoop(
        models,
        draft,
        opts,
        k=k,
        rows=b,
        capacity=kv_bucket(need, top, kv_block),
        graph_cache=graph_cache,
        stops=StopStringScanner(tokenizer, opts.stop_strings) if opts.stop_strings else None,
    )
    loop.start(prompt.to(models.device), mask.to(models.device))
    return loop
