"""`ivl-fast make-tiny`: a random tiny base/value pair with a BPE tokenizer, built offline."""

from __future__ import annotations

from pathlib import Path

from .errors import DefaultsHelp


def add_parser(sub) -> None:
    t = sub.add_parser(
        "make-tiny",
        help="build a random tiny base/value pair with a BPE tokenizer (offline)",
        formatter_class=DefaultsHelp,
    )
    t.add_argument("--out", type=Path, required=True, help="directory to create base/ and value/ in")
    t.add_argument("--vocab-size", type=int, default=1024, help="BPE tokenizer size")
    t.add_argument("--seed", type=int, default=0, help="weight seed")
    t.set_defaults(func=run)


def run(args) -> int:
    from ..tiny import make_tiny_pair

    paths = make_tiny_pair(args.out, vocab_size=args.vocab_size, seed=args.seed)
    for k, v in paths.items():
        print(f"{k}: {v}")
    return 0
