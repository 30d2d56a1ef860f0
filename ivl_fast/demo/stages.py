"""The demo's progress on stderr: ``stage i/N`` for every stage, the time so far and an estimate of what is left,
and "reusing" for a stage whose output an earlier run left in the work dir.

The estimate weighs each stage by its rough cost relative to the others (measured on 2 cores: the largest trainings
and lm-eval's rows weigh most) and projects the pace of the stages this run actually computed; reused stages cost
nothing. It is an estimate: the first stages' pace sets it.
"""

from __future__ import annotations

import sys
import time


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}:{s:02d}"


class Stages:
    """``weights``: (label, relative cost) of every stage in order; :meth:`begin` each one as it starts."""

    def __init__(self, weights: list[tuple[str, float]], out=None):
        self.labels = [label for label, _ in weights]
        self.weights = [w for _, w in weights]
        self.out = out or sys.stderr
        self.t0 = time.perf_counter()
        self.i = 0  # stages begun
        self.computed_weight = 0.0  # of the stages finished that were computed (not reused)
        self.computed_seconds = 0.0
        self._started: tuple[float, float, bool] | None = None  # (start, weight, reused) of the running stage

    def _finish_running(self) -> None:
        if self._started is not None:
            start, weight, reused = self._started
            if not reused:
                self.computed_weight += weight
                self.computed_seconds += time.perf_counter() - start
            self._started = None

    def begin(self, label: str, reused: bool = False) -> None:
        """Stage ``label`` starts (it must be the next one of the list); ``reused``: its output is in the work dir."""
        self._finish_running()
        if self.i >= len(self.labels) or self.labels[self.i] != label:
            raise ValueError(f"stage {label!r} is not the next one ({self.labels[self.i : self.i + 1]})")
        self.i += 1
        elapsed = time.perf_counter() - self.t0
        left = ""
        if self.computed_weight > 0:
            rest = sum(self.weights[self.i - 1 :])
            left = f", about {_clock(rest * self.computed_seconds / self.computed_weight)} left"
        note = " (reusing the work dir's)" if reused else ""
        print(f"demo: stage {self.i}/{len(self.labels)} [{_clock(elapsed)} so far{left}] {label}{note}",
              file=self.out, flush=True)  # fmt: skip
        self._started = (time.perf_counter(), self.weights[self.i - 1], reused)

    def end(self) -> float:
        """The last stage ended: -> seconds in all."""
        self._finish_running()
        total = time.perf_counter() - self.t0
        print(f"demo: done in {_clock(total)}", file=self.out, flush=True)
        return total
