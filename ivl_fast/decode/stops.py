"""Host-side stop checks, run at the batched host sync: non-finite logits and stop strings.

EOS and budgets stop rows on device inside the step; what needs the text (stop strings) or must raise (NaN/inf)
is looked at here, every ``sync_every`` steps.
"""

from __future__ import annotations

import torch


class NonFiniteLogitsError(FloatingPointError):
    """A model produced NaN or inf logits; no token was emitted from them."""


def nonfinite_error(rows: list[int], first: int, last: int) -> NonFiniteLogitsError:
    err = NonFiniteLogitsError(
        f"non-finite (NaN/inf) logits for batch row(s) {rows} within steps [{first}, {last}); "
        "no tokens were returned from them"
    )
    err.rows = list(rows)  # the slots a server fails (the others carry on)
    return err


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


def cut_at_stop_strings(bufs, scanner: StopStringScanner, checked: dict[int, int], emitted: dict[int, int], pad_id):
    """End the rows of ``checked`` (slot -> tokens already scanned) whose new tokens complete a stop string: their
    output after that token becomes pad and they are finished there. ``emitted``: slot -> tokens it has emitted (an
    upper bound is fine); ``checked`` is advanced to it. Host work (one read of the output)."""
    slots = sorted(checked)
    out = bufs.out[slots].tolist()
    stop_step, finished = bufs.stop_step.tolist(), bufs.finished.tolist()
    new: dict[int, int] = {}
    for row, r in zip(out, slots, strict=True):
        end = stop_step[r] + 1 if finished[r] else emitted[r]  # up to the row's last token
        if end > checked[r]:
            s = scanner.first_stop(row, checked[r], end)
            if s is not None and (not finished[r] or s < stop_step[r]):
                new[r] = s
        checked[r] = emitted[r]
    if new:
        dev = bufs.out.device
        rows = torch.tensor(list(new), dtype=torch.int64, device=dev)
        at = torch.tensor(list(new.values()), dtype=torch.int64, device=dev)
        cols = torch.arange(bufs.out.shape[1], device=dev)[None]
        after = torch.zeros_like(bufs.out, dtype=torch.bool)
        after[rows] = cols > at[:, None]
        bufs.out.masked_fill_(after, pad_id)
        bufs.logprobs.masked_fill_(after, 0.0)
        bufs.stop_step.index_copy_(0, rows, at)
        bufs.finished.index_fill_(0, rows, True)
        bufs.done.copy_(bufs.finished.all().to(torch.int32).reshape(1))
