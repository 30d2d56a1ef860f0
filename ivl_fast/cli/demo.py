"""`ivl-fast demo`: the paper's transfer table in miniature (see the ivl_fast.demo package)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .errors import DefaultsHelp


def add_parser(sub) -> None:
    dm = sub.add_parser(
        "demo",
        help="the paper's transfer table in miniature, built from nothing (CPU, offline)",
        formatter_class=DefaultsHelp,
    )
    dm.add_argument("--quick", action="store_true", help="a much smaller version (the test suite runs it)")
    dm.add_argument("--work-dir", type=Path, default=Path("ivl-demo"), help="cache of everything the demo builds")
    dm.add_argument("--seed", type=int, default=0, help="seed of the world, the tokenizers' text and the training")
    dm.add_argument("--json", action="store_true", help="print the results as one JSON object")
    dm.set_defaults(func=run)


def run(args) -> int:
    from ..demo import DemoConfig, run_demo

    result = run_demo(DemoConfig(work_dir=str(args.work_dir), quick=args.quick, seed=args.seed))
    if args.json:
        print(json.dumps(result))
    else:
        from ..demo.report import to_markdown

        print(to_markdown(result))
        print(f"results: {args.work_dir}/results.json, results.md, results.png", file=sys.stderr)
    return 0
