"""SlotRequest: what one request brings to a continuous batch (:meth:`DecodeLoop.admit_many`)."""

from __future__ import annotations

from dataclasses import dataclass

from ..sampling import SamplingParams

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


@dataclass(frozen=True)
class SlotRequest:
    """prompt_ids: the prompt; max_new_tokens: its budget (None: the batch's default); sampling, alpha: its values
    (None: the batch's; a batch opened with ``per_request=True`` only); seed: its own random stream (sampled rows
    draw the same tokens whatever shares the batch; None: the batch's stream); top_logprobs: how many of the most
    likely tokens to record per step with their log-probabilities (at most the batch's ``top_logprobs``); text:
    across vocabularies, the prompt's text as the base reads it (None: the value tokenizer's decoding of
    ``prompt_ids``)."""

    prompt_ids: list[int] | tuple[int, ...]
    max_new_tokens: int | None = None
    sampling: SamplingParams | None = None
    alpha: float | None = None
    seed: int | None = None
    top_logprobs: int = 0
    text: str | None = None

    @classmethod
    def of(cls, request) -> SlotRequest:
        """A SlotRequest, or a tuple of its fields in order (``(prompt_ids, max_new_tokens, sampling, alpha)``)."""
        return request if isinstance(request, SlotRequest) else cls(*request)


__all__ = ["SlotRequest"]
