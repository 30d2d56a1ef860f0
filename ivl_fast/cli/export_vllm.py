"""`ivl-fast export-vllm`: the directory that `vllm serve` and `vllm.LLM` load a base + value pair from."""

from __future__ import annotations

from pathlib import Path

from .errors import DefaultsHelp


def add_parser(sub) -> None:
    e = sub.add_parser(
        "export-vllm",
        help="write a directory that `vllm serve` loads the pair from (no weights copied)",
        description="Write DIR for `vllm serve DIR` / `vllm.LLM(DIR)`: the base's config naming both checkpoints "
        "and alpha, the pair's tokenizer and chat template, and the generation config FastIVLDecoder would use. "
        "The checkpoints are read in place when vLLM loads the pair (keep them where they are). Alpha can be "
        "changed at launch: vllm serve DIR --hf-overrides '{\"ivl_alpha\": 0.5}'.",
        formatter_class=DefaultsHelp,
    )
    e.add_argument("--base", type=Path, required=True, help="base model checkpoint directory")
    e.add_argument("--value", type=Path, required=True, help="value network checkpoint directory (same tokenizer)")
    e.add_argument("--alpha", type=float, default=1.0, help="weight of the value network's logits")
    e.add_argument("--out", type=Path, required=True, help="the directory to create (new or empty)")
    e.set_defaults(func=run)


def run(args) -> int:
    from ..vllm import export_pair

    out = export_pair(args.base, args.value, args.out, alpha=args.alpha)
    print(f"wrote {out}")
    print(f"serve it: vllm serve {out}    (alpha at launch: --hf-overrides '{{\"ivl_alpha\": {args.alpha}}}')")
    return 0
