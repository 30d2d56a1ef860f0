"""`ivl-fast demo`: the paper's tables in miniature, built from nothing on a CPU.

One job per module: run.py (the stages and the rows), world.py (the made-up world and its texts), premise.py (the
premise, measured), report.py (the tables, the plot, README's block), tasks.py (the world as local lm-eval tasks),
evaluation.py (each row's lm-eval scores).
"""

from .run import (
    MARKER,
    DemoConfig,
    evaluate,
    make_tokenizers,
    prepare_work_dir,
    run_demo,
)
from .world import CITIES, COLORS, demonstrations, make_world, pretraining_text

__all__ = [
    "CITIES",
    "COLORS",
    "MARKER",
    "DemoConfig",
    "demonstrations",
    "evaluate",
    "make_tokenizers",
    "make_world",
    "prepare_work_dir",
    "pretraining_text",
    "run_demo",
]
