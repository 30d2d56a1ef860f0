"""Log-likelihood scoring: how likely a continuation is under the combined distribution log_softmax(z_base +
alpha * z_value) (every scheme; cascade value networks read the base's distribution), as lm-evaluation-harness's
Hugging Face model scores it.

Semantics (lm-eval's ``HFLM``): a request is (context ids, continuation ids); the model reads
``(context + continuation)[-(max_length + 1):][:-1]`` (left truncation to the window) and the continuation's
log-probability is the sum over its tokens, with ``is_greedy`` true when every one of them is the argmax. Text
requests are split and tokenized as ``HFLM`` does (:func:`encode_pair`: trailing spaces of the context move to
the continuation; the tokenizer's own special tokens, :func:`tok_encode`; an empty context reads the prefix
token). Rolling log-likelihood (perplexity)
scores a whole text in windows of ``max_length`` tokens, each token once (:func:`rolling_requests`).

Memory: one forward of each model per batch (requests sorted by length, right-padded); the hidden states at the
scored positions are projected to the vocabulary in row chunks, so no [tokens, V] logits of both models are ever
held (the transformers adapter returns its logits whole; only its scored positions are kept). Graph-free; CPU and
GPU. Across vocabularies the requests are teacher-forced through the cross-vocabulary decoding machinery instead
(:mod:`.cross_vocab_scoring`): the base re-reads the text at every scored position, as decoding does.
"""

from __future__ import annotations

import torch

from ..checks import check_int, is_int
from ..sampling import combine_logits
from .model_set import ModelSet

CHUNK_ROWS = 512  # scored positions projected to the vocabulary at once: [CHUNK_ROWS, V] fp32 per model


def encode_pair(tokenizer, context: str, continuation: str, add_bos_token: bool | None = None):
    """(context ids, continuation ids) the way lm-eval's HF model (0.4.x ``TemplateLM.loglikelihood`` and
    ``_encode_pair``) splits text: trailing whitespace of the context belongs to the continuation, and the
    continuation's ids are those the whole text adds after the context's ids, both encoded by :func:`tok_encode`.
    An empty context reads the prefix token (BOS, else EOS), unless the continuation starts with it."""
    if context == "":
        cont = tok_encode(tokenizer, continuation, add_special_tokens=False)
        prefix = prefix_token_id(tokenizer)
        return ([prefix], cont) if not cont or cont[0] != prefix else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation, context = context[-n_spaces:] + continuation, context[:-n_spaces]
    whole = tok_encode(tokenizer, context + continuation, add_bos_token=add_bos_token)
    ctx = tok_encode(tokenizer, context, add_bos_token=add_bos_token)
    return ctx, whole[len(ctx) :]


def tok_encode(tokenizer, text: str, add_special_tokens: bool | None = None, add_bos_token: bool | None = None):
    """lm-eval HFLM's ``tok_encode``: the tokenizer's own special tokens by default (``add_bos_token`` overrides),
    none when the text already starts with the prefix token's text."""
    if add_special_tokens is not None:
        kwargs = {"add_special_tokens": add_special_tokens}
    elif add_bos_token is not None:
        kwargs = {"add_special_tokens": add_bos_token}
    else:
        kwargs = {}
    if add_special_tokens is None and text.startswith(tokenizer.decode(prefix_token_id(tokenizer))):
        kwargs["add_special_tokens"] = False
    return list(tokenizer.encode(text, **kwargs))


def prefix_token_id(tokenizer) -> int:
    """What an empty context reads: the BOS id, else the EOS id (lm-eval's ``prefix_token_id``)."""
    tid = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if tid is None:
        raise ValueError("an empty context needs a BOS or EOS token in the tokenizer")
    return int(tid)


def rolling_requests(tokens: list[int], prefix: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """Disjoint windows covering ``tokens`` for rolling log-likelihood: each token is predicted exactly once, from
    up to ``max_length`` tokens before it (the first window reads ``prefix`` first). -> (context, continuation)
    requests (lm-eval's rolling windows with context_len=1, made disjoint)."""
    out = []
    first = min(max_length, len(tokens))
    out.append(([prefix], tokens[:first]))
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, max_length)
        end = done + n
        window = tokens[max(0, end - max_length - 1) : end - 1]  # the inputs; the last n of them predict the new
        out.append((window[: len(window) - (n - 1)], tokens[done:end]))
        done = end
    return out


def _check_request(i: int, context, continuation, vocab: int, max_length: int) -> tuple[list[int], list[int]]:
    ctx, cont = list(context), list(continuation)
    for name, ids in (("context", ctx), ("continuation", cont)):
        bad = next((x for x in ids if not is_int(x) or not 0 <= x < vocab), None)
        if bad is not None:
            raise ValueError(f"request {i}: {name} must hold token ids in [0, {vocab}), holds {bad!r}")
    if not cont:
        raise ValueError(f"request {i}: the continuation is empty (nothing to score)")
    if not ctx:
        raise ValueError(f"request {i}: the context is empty (give at least the prefix token)")
    if len(cont) > max_length:
        raise ValueError(f"request {i}: a continuation of {len(cont)} tokens exceeds max_length={max_length}")
    return ctx, cont


def _head(engine):
    """-> run(ids [B, T], mask, inputs_embeds=None) giving a projector: rows of (b, t) -> logits [n, V] fp32."""
    lean = getattr(engine, "supports_inputs_embeds", False)

    def run(ids, mask, inputs_embeds=None):
        if lean:
            h = engine.forward(
                None if inputs_embeds is not None else ids, mask, output_hidden=True, inputs_embeds=inputs_embeds
            )
            return lambda b, t: engine.project(h[b, t]).float()
        z = engine.forward(ids, mask)  # the transformers adapter: its whole logits
        return lambda b, t: z[b, t].float()

    return run


def _probe_head(base, probe):
    """-> run(ids, mask) giving (base projector, probe projector) over one base pass (rows of (b, t) -> [n, V])."""

    def run(ids, mask):
        h = base.forward(ids, mask, output_hidden=True)
        return (lambda b, t: base.project(h[b, t]).float()), (lambda b, t: probe.logits(h[b, t]).float())

    return run


@torch.inference_mode()
def score(
    models: ModelSet,
    requests,
    *,
    max_length: int,
    batch_size: int = 8,
    chunk_rows: int = CHUNK_ROWS,
) -> list[tuple[float, bool]]:
    """Per (context ids, continuation ids) request: (summed log-probability of the continuation, is_greedy), in the
    requests' order. See the module docstring."""
    if models.cross_vocab:
        raise ValueError(
            "score() reads one vocabulary; across vocabularies use loglikelihood() (it needs both tokenizers)"
        )
    check_int(batch_size, "batch_size", 1)
    check_int(max_length, "max_length", 1, models.max_context)
    reqs = [_check_request(i, c, x, models.vocab_size, max_length) for i, (c, x) in enumerate(requests)]
    dev = models.device
    # longest first, as lm-eval batches (equal-length neighbours pad little)
    order = sorted(range(len(reqs)), key=lambda i: -(len(reqs[i][0]) + len(reqs[i][1])))
    out: list[tuple[float, bool] | None] = [None] * len(reqs)
    base_run = _head(models.base) if models.base in models.engines else None
    value_run = _head(models.value) if models.value in models.engines else None
    if models.probe:  # the probe reads the base's final hidden states: both projectors from one base pass
        base_run = value_run = None
        probe_run = _probe_head(models.base, models.value)
    term_runs = [(_head(e), w) for e, w in models.terms]  # logit terms: + w_i * z_i
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        inputs = [(reqs[i][0] + reqs[i][1])[-(max_length + 1) :][:-1] for i in idx]
        t = max(len(x) for x in inputs)
        ids = torch.zeros((len(idx), t), dtype=torch.int64)
        mask = torch.zeros((len(idx), t), dtype=torch.bool)
        rows, cols, targets, owner = [], [], [], []
        for r, (i, x) in enumerate(zip(idx, inputs, strict=True)):
            ids[r, : len(x)] = torch.tensor(x)
            mask[r, : len(x)] = True
            cont = reqs[i][1]
            rows += [r] * len(cont)
            cols += range(len(x) - len(cont), len(x))  # the positions whose next token is the continuation's
            targets += cont
            owner += [r] * len(cont)
        ids, mask = ids.to(dev), mask.to(dev)
        rows_t, cols_t = torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)
        tgt = torch.tensor(targets, device=dev)
        base_at = base_run(ids, mask) if base_run is not None else None
        if models.probe:
            base_at, value_at = probe_run(ids, mask)
        elif models.cascade:  # the value network reads softmax(z_base) @ E (+ E[token]) at every position
            emb = _soft_inputs(models, base_at, ids, mask, chunk_rows)
            value_at = value_run(ids, mask, inputs_embeds=emb)
        else:
            value_at = value_run(ids, mask) if value_run is not None else None
        terms_at = [(run(ids, mask), w) for run, w in term_runs]
        lp = torch.empty(len(targets), dtype=torch.float64, device=dev)
        hit = torch.empty(len(targets), dtype=torch.bool, device=dev)
        for c in range(0, len(targets), chunk_rows):
            b, p = rows_t[c : c + chunk_rows], cols_t[c : c + chunk_rows]
            # [n, V_rows] per model -> [n, real_vocab] views (ModelSet.trim): padding rows of models padded to
            # different sizes take no probability, so log_softmax normalises over the real ids only
            zb = models.trim(base_at(b, p)) if base_at is not None else None
            zv = models.trim(value_at(b, p)) if value_at is not None else None
            z = combine_logits(zb, zv, models.alpha, [(models.trim(at(b, p)), w) for at, w in terms_at])
            logp = z.log_softmax(-1)
            y = tgt[c : c + chunk_rows]
            lp[c : c + chunk_rows] = logp.gather(1, y[:, None])[:, 0].double()
            hit[c : c + chunk_rows] = logp.argmax(-1) == y
        owner_t = torch.tensor(owner, device=dev)
        sums = torch.zeros(len(idx), dtype=torch.float64, device=dev).index_add_(0, owner_t, lp)
        misses = torch.zeros(len(idx), dtype=torch.int64, device=dev).index_add_(0, owner_t, (~hit).long())
        greedy = misses == 0
        for r, i in enumerate(idx):
            out[i] = (float(sums[r]), bool(greedy[r]))
    return out


def _soft_inputs(models: ModelSet, base_at, ids, mask, chunk_rows: int) -> torch.Tensor:
    """Cascade input of every position, [B, T, H_value], built in row chunks from the base's logits."""
    value = models.value
    b, t = ids.shape
    flat_b = torch.arange(b, device=ids.device).repeat_interleave(t)
    flat_t = torch.arange(t, device=ids.device).repeat(b)
    parts = []
    for c in range(0, b * t, chunk_rows):
        rb, rt = flat_b[c : c + chunk_rows], flat_t[c : c + chunk_rows]
        tok = ids[rb, rt] if models.scheme == "cascade+" else None
        parts.append(value.soft_embed(models.cascade_input(base_at(rb, rt)), tok))
    return torch.cat(parts).reshape(b, t, -1)


def _score_any(models: ModelSet, tokenizer, base_tokenizer, reqs, texts, max_length: int, batch_size: int):
    """:func:`score`, or across vocabularies :func:`.cross_vocab_scoring.score_across_vocabularies` (``texts``: each
    context's text as the base reads it, None where the ids' decoding is)."""
    if not models.cross_vocab:
        return score(models, reqs, max_length=max_length, batch_size=batch_size)
    from .cross_vocab_scoring import score_across_vocabularies

    if tokenizer is None or base_tokenizer is None:
        raise ValueError("scoring across vocabularies needs both tokenizers (tokenizer=value's, base_tokenizer=)")
    check_int(max_length, "max_length", 1, models.max_context)
    reqs = [_check_request(i, c, x, models.vocab_size, max_length) for i, (c, x) in enumerate(reqs)]
    return score_across_vocabularies(
        models, tokenizer, base_tokenizer, reqs, texts=texts, max_length=max_length, batch_size=batch_size
    )


def loglikelihood(
    models: ModelSet,
    tokenizer,
    requests,
    max_length: int,
    batch_size: int = 8,
    *,
    base_tokenizer=None,
    texts: list[str | None] | None = None,
):
    """:func:`score` of (context, continuation) requests given as texts (split by :func:`encode_pair`) or ids.
    Across vocabularies (``base_tokenizer``: the base's) the base reads each context's text: a text request's own,
    else ``texts[i]`` when given, else the decoding of its ids."""
    if texts is not None and len(texts) != len(requests):
        raise ValueError(f"texts has {len(texts)} entries for {len(requests)} requests")
    reqs, read = [], []
    for i, (context, continuation) in enumerate(requests):
        if isinstance(context, str) or isinstance(continuation, str):
            if not (isinstance(context, str) and isinstance(continuation, str)):
                raise TypeError(f"request {i}: context and continuation must both be texts or both token-id lists")
            if tokenizer is None:
                raise ValueError("scoring text needs a tokenizer: pass tokenizer=... or load checkpoints with one")
            reqs.append(encode_pair(tokenizer, context, continuation))
            read.append(context.rstrip() or None)  # encode_pair moves the trailing whitespace to the continuation
        else:
            reqs.append((context, continuation))
            read.append(texts[i] if texts is not None else None)
    return _score_any(models, tokenizer, base_tokenizer, reqs, read, max_length, batch_size)


def loglikelihood_rolling(
    models: ModelSet, tokenizer, texts, max_length: int, batch_size: int = 8, *, base_tokenizer=None
) -> list[float]:
    """Summed log-probability of each whole text (or token-id list) over :func:`rolling_requests` windows."""
    if tokenizer is None:
        raise ValueError("rolling log-likelihood needs a tokenizer (its prefix token starts the first window)")
    prefix = prefix_token_id(tokenizer)
    windows = []
    for i, t in enumerate(texts):
        ids = tok_encode(tokenizer, t) if isinstance(t, str) else list(t)
        if not ids:
            raise ValueError(f"text {i} is empty (nothing to score)")
        windows.append(rolling_requests(ids, prefix, max_length))
    flat = [w for ws in windows for w in ws]
    scores = iter(_score_any(models, tokenizer, base_tokenizer, flat, None, max_length, batch_size))
    return [sum(next(scores)[0] for _ in ws) for ws in windows]
