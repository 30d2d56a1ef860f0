"""Host-side stop checks, run at the batched host sync: non-finite logits and stop strings.

EOS and budgets stop rows on device inside the step; what needs the text (stop strings) or must raise (NaN/inf)
is looked at here, every ``sync_every`` steps.
"""

from __future__ import annotations


class NonFiniteLogitsError(FloatingPointError):
    """A model produced NaN or inf logits; no token was emitted from them."""


def nonfinite_error(rows: list[int], first: int, last: int) -> NonFiniteLogitsError:
    return NonFiniteLogitsError(
        f"non-finite (NaN/inf) logits for batch row(s) {rows} within steps [{first}, {last}); "
        "no tokens were returned from them"
    )


class StopStringScanner:
    """Finds the first token whose text completes a stop string.

    A token "completes" a stop string when the decoded text up to and including it contains the string and the text
    before it does not; texts are decoded over a window of the last tokens (enough to span any stop string), so the
    cost per token does not grow with the row's length.
    """

    def __init__(self, tokenizer, stop_strings):
        if tokenizer is None:
            raise ValueError("stop_strings needs a tokenizer: pass tokenizer=... or load checkpoints that include one")
        self.tokenizer, self.stops = tokenizer, tuple(stop_strings)
        self.window = max(len(s) for s in self.stops) + 8  # tokens enough to span any stop string

    def first_stop(self, row: list[int], start: int, end: int) -> int | None:
        """The index in [start, end) of the token of ``row`` completing a stop string, or None."""
        tok = self.tokenizer
        for s in range(start, end):
            lo = max(0, s - self.window)
            prev, cur = tok.decode(row[lo:s]), tok.decode(row[lo : s + 1])
            if any(x in cur and x not in prev for x in self.stops):
                return s
        return None
