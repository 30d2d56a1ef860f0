"""Log-likelihood scoring across vocabularies: a continuation in the value vocabulary scored under the distribution
cross-vocabulary decoding samples from.

Decoding across vocabularies re-derives the base's context from the text after every value token (the base reads
its own tokenization, boundaries included: :mod:`.cross_vocab`, :mod:`.boundary`), so the base's distribution at a
scored position depends on the text up to it, not on a fixed token sequence; one forward over the whole sequence
cannot give it. The requests are therefore teacher-forced through the same machinery decoding runs (the
:class:`~ivl_fast.decode.cross_vocab_feed.CrossVocabFeed`, one batch of requests in lock step): at each position
the combined log-probabilities log_softmax(base side + alpha * z_value) are those decoding samples from (no
penalties, as lm-eval scores), the continuation's token is read off and then fed instead of a sampled one. Cost:
per batch of ``batch_size`` requests, one prefill and as many steps as its longest continuation (each step one
value token per row and the base's re-read suffixes), not one forward per scored position.

Window: lm-eval's left truncation on the value side, ``(context + continuation)[-(max_length + 1):][:-1]``; the
base reads the truncated context's text (the request's own text when nothing was cut).
"""

from __future__ import annotations

import torch

from ..checks import check_int
from ..sampling import combine_logits
from .cross_vocab import Retokenizer, prompt_text
from .cross_vocab_feed import CrossVocabFeed
from .inputs import left_pad
from .model_set import ModelSet


@torch.inference_mode()
def score_across_vocabularies(
    models: ModelSet,
    tokenizer,
    base_tokenizer,
    requests: list[tuple[list[int], list[int]]],
    *,
    texts: list[str | None] | None = None,
    max_length: int,
    batch_size: int = 8,
) -> list[tuple[float, bool]]:
    """Per (context ids, continuation ids) request (checked by the caller): (summed log-probability of the
    continuation, is_greedy), in the requests' order. ``texts``: each context's text as the base should read it
    (None: :func:`~.cross_vocab.prompt_text` of the context ids)."""
    check_int(batch_size, "batch_size", 1)
    order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][0]) + len(requests[i][1])))
    out: list[tuple[float, bool] | None] = [None] * len(requests)
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        contexts, conts, base_texts = [], [], []
        for i in idx:
            ctx, cont = requests[i]
            window = (ctx + cont)[-(max_length + 1) :][:-1]
            kept = window[: len(window) - len(cont) + 1]  # the context's tail that stays in the window
            text = texts[i] if texts is not None and len(kept) == len(ctx) else None
            contexts.append(kept)
            conts.append(cont)
            base_texts.append(prompt_text(tokenizer, kept) if text is None else text)
        for i, r in zip(idx, _score_batch(models, tokenizer, base_tokenizer, contexts, conts, base_texts), strict=True):
            out[i] = r
    return out


def _score_batch(models, tokenizer, base_tokenizer, contexts, conts, texts) -> list[tuple[float, bool]]:
    m, n = models, len(contexts)
    retok = Retokenizer(tokenizer, base_tokenizer, contexts, texts, m.same_tokenizers, m.base.max_context)
    longest = max(len(c) for c in conts)
    feed = CrossVocabFeed(m, retok, n)
    capacity = max(len(c) for c in contexts) + longest
    feed.allocate(capacity, capacity, longest, False)
    prompt, mask = left_pad(contexts, 0)
    zb, zv, _, pushed = feed.prefill(prompt.to(m.device), mask.to(m.device))
    sums = torch.zeros(n, dtype=torch.float64, device=m.device)
    greedy = torch.ones(n, dtype=torch.bool, device=m.device)
    for k in range(longest):
        base_side = zb if pushed else m.vocab_map.apply(zb)
        logp = combine_logits(base_side, zv, m.alpha).log_softmax(-1)  # what decoding samples from
        live = torch.tensor([k < len(c) for c in conts], device=m.device)
        y = torch.tensor([c[k] if k < len(c) else 0 for c in conts], device=m.device)
        sums += torch.where(live, logp.gather(1, y[:, None])[:, 0].double(), 0.0)
        greedy &= ~live | (logp.argmax(-1) == y)
        if k + 1 < longest:
            done = torch.tensor([k + 1 >= len(c) for c in conts], device=m.device)
            zb, zv, _, pushed = feed.step(y, done, False)
    return [(float(a), bool(g)) for a, g in zip(sums.tolist(), greedy.tolist(), strict=True)]


__all__ = ["score_across_vocabularies"]
