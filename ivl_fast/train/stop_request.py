"""Ctrl-C during training: finish the optimizer step, save a checkpoint, stop with the way to resume.

A first SIGINT only sets a flag that the loop reads between optimizer steps (a checkpoint taken in the middle
of a step would hold half-accumulated gradients). A second SIGINT stops at once (plain KeyboardInterrupt);
the latest checkpoint on disk is then whatever the last save wrote.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on Ctrl-C after saving a checkpoint at ``step`` in ``checkpoint``."""

    def __init__(self, step: int, checkpoint: Path | None):
        super().__init__(f"interrupted after step {step}; checkpoint: {checkpoint}")
        self.step, self.checkpoint = step, checkpoint


class StopRequest:
    """Context manager: while active, the first SIGINT sets ``requested``; the second raises KeyboardInterrupt."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def _handler(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(
            "\nCtrl-C: finishing this step, then saving a checkpoint (press Ctrl-C again to stop now)",
            file=sys.stderr,
            flush=True,
        )

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc) -> bool:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False
