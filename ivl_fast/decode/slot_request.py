"""SlotRequest: what one request brings to a continuous batch (:meth:`DecodeLoop.admit_many`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..checks import check_int, is_int, is_number
from ..sampling import FLOAT32_MAX, SamplingParams

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


@dataclass(frozen=True)
class SlotRequest:
    """prompt_ids: the prompt; max_new_tokens: its budget (None: the batch's default); sampling, alpha: its values
    (None: the batch's; a batch opened with ``per_request=True`` only); seed: its own random stream (sampled rows
    draw the same tokens whatever shares the batch; None: the batch's stream); top_logprobs: how many of the most
    likely tokens to record per step with their log-probabilities (at most the batch's ``top_logprobs``); text:
    across vocabularies, the prompt's text as the base reads it (None: the value tokenizer's decoding of
    ``prompt_ids``); components: the top-k of the base, of the value's delta and of the combination to record per
    step (:mod:`.components`; at most the batch's ``components``)."""

    prompt_ids: list[int] | tuple[int, ...]
    max_new_tokens: int | None = None
    sampling: SamplingParams | None = None
    alpha: float | None = None
    seed: int | None = None
    top_logprobs: int = 0
    text: str | None = None
    components: int = 0

    @classmethod
    def of(cls, request) -> SlotRequest:
        """A SlotRequest, or a tuple of its fields in order (``(prompt_ids, max_new_tokens, sampling, alpha)``)."""
        return request if isinstance(request, SlotRequest) else cls(*request)


class RequestError(ValueError):
    """A request a batch refuses; ``field``: the SlotRequest field at fault (a server names its parameter)."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


def check_slot_request(
    request,
    i: int,
    *,
    per_request: bool,
    alpha: float,
    alpha_why: str | None,
    seed_why: str | None,
    max_top_logprobs: int,
    top_why: str,
    default_budget: int,
    max_budget: int,
    max_seq_len: int,
    default_sampling: SamplingParams,
    vocab_size: int,
    max_components: int = 0,
) -> SlotRequest:
    """``request`` (a :class:`SlotRequest` or its tuple) checked against a batch -> the SlotRequest with the
    defaults filled in (budget, sampling, alpha); ValueError naming request ``i`` and the field. Everything a
    request brings is checked here, before it touches the batch: prompt ids in ``[0, vocab_size)``, every number
    representable where it will live (alpha in float32; the sampling values are checked by SamplingParams).

    alpha: the decoder's; alpha_why: why an alpha other than it is refused (None: any alpha per row); seed_why:
    why a seed on a sampled request is refused (None: seeds per row); top_why: why top alternatives are refused
    when ``max_top_logprobs`` is 0."""
    r = SlotRequest.of(request)
    where = f"request {i}: " if i else ""
    if (r.sampling is not None or r.alpha is not None or r.seed is not None) and not per_request:
        field = "sampling" if r.sampling is not None else "alpha" if r.alpha is not None else "seed"
        why = "sampling, alpha or seed per request needs a batch opened with per_request=True"
        raise RequestError(f"{where}{why}", field)
    a = r.alpha
    if a is not None:
        if not is_number(a) or not math.isfinite(a) or abs(a) > FLOAT32_MAX:
            why = f"alpha must be a finite number within float32's range (3.4e38), got {a!r}"
            raise RequestError(f"{where}{why}", "alpha")
        if alpha_why is not None and float(a) != alpha:
            raise RequestError(f"{where}alpha={a} differs from the decoder's {alpha}: {alpha_why}", "alpha")
    sampling = r.sampling or default_sampling
    seed = r.seed
    if seed is not None:
        if not is_int(seed) or not INT64_MIN <= seed <= INT64_MAX:
            raise RequestError(f"{where}seed must be an integer in [-2^63, 2^63), got {seed!r}", "seed")
        if seed_why is not None and not sampling.greedy:
            raise RequestError(f"{where}seed with sampling is not supported {seed_why}", "seed")
    top = r.top_logprobs
    if top and not max_top_logprobs:
        raise RequestError(f"{where}top_logprobs is not supported {top_why}", "top_logprobs")
    if not is_int(top) or not 0 <= top <= max_top_logprobs:
        raise RequestError(
            f"{where}top_logprobs must be an integer in [0, {max_top_logprobs}] (the batch's top_logprobs), "
            f"got {top!r}",
            "top_logprobs",
        )
    comps = r.components
    if not is_int(comps) or not 0 <= comps <= max_components:
        raise RequestError(
            f"{where}components must be an integer in [0, {max_components}] (the batch's components), got {comps!r}",
            "components",
        )
    budget = default_budget if r.max_new_tokens is None else r.max_new_tokens
    try:
        check_int(budget, f"{where}max_new_tokens", 1, max_budget)
    except ValueError as e:
        raise RequestError(str(e), "max_new_tokens") from None
    ids = r.prompt_ids
    if not isinstance(ids, list | tuple) or not ids or len(ids) + budget > max_seq_len:
        raise RequestError(
            f"{where}a prompt of {len(ids)} tokens + max_new_tokens {budget} does not fit the batch's max_seq_len of "
            f"{max_seq_len} (and a prompt needs at least one token)",
            "prompt_ids",
        )
    bad = next((t for t in ids if not is_int(t)), None)
    if bad is not None:
        raise RequestError(f"{where}prompt_ids must hold integer token ids, got {bad!r}", "prompt_ids")
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise RequestError(f"{where}prompt token id {bad} is outside the vocabulary [0, {vocab_size})", "prompt_ids")
    a = alpha if a is None else float(a)
    return SlotRequest(ids, budget, sampling, a, seed, top, r.text, comps)


__all__ = ["RequestError", "SlotRequest", "check_slot_request"]
