"""The flags naming an IVL pair, shared by every subcommand that loads one (generate, eval)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from ..schemes import DECODE_SCHEMES
from .errors import UsageError


def add_pair_args(p: argparse.ArgumentParser, *, vocab_map_help: str) -> argparse._ArgumentGroup:
    """--base / --value (group "required"), --vocab-map, --alpha, --scheme, --device, --dtype (group "models");
    -> the "models" group, for the subcommand's own model flags."""
    req = p.add_argument_group("required")
    req.add_argument(
        "--base", type=Path, metavar="DIR", help="base model checkpoint directory; not with --scheme value_only"
    )
    req.add_argument(
        "--value", type=Path, metavar="DIR", help="value network checkpoint directory; not with --scheme base"
    )
    g = p.add_argument_group("models")
    g.add_argument("--vocab-map", type=Path, default=None, metavar="FILE", help=vocab_map_help)
    g.add_argument("--alpha", type=float, default=1.0, help="weight of the value logits")
    g.add_argument(
        "--scheme",
        default=None,
        choices=list(DECODE_SCHEMES),
        help="default: the value checkpoint's ivl.json, else residual",
    )
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g.add_argument(
        "--dtype", default=None, help="float32 | float16 | bfloat16 (default: fp32 on CPU, checkpoint's on GPU)"
    )
    g.add_argument(
        "--tp",
        type=int,
        default=None,
        metavar="N",
        help="tensor parallelism: shard the base over N processes, one per GPU (run under torchrun "
        "--nproc_per_node N -m ivl_fast.cli ...); the value network is replicated",
    )
    g.add_argument(
        "--draft",
        type=Path,
        default=None,
        metavar="DIR",
        help="speculative decoding: a small base sharing the base's tokenizer (the value network's training base) "
        "drafts tokens with the value network; the base verifies them. Same outputs' law, fewer base steps",
    )
    g.add_argument(
        "--term",
        nargs=2,
        action="append",
        default=None,
        metavar=("DIR", "WEIGHT"),
        help="one more same-vocabulary model in the logit arithmetic z = z_base + alpha z_value + sum w z_DIR "
        "(repeatable). Proxy tuning: --base LARGE --value SMALL_TUNED --term SMALL -1",
    )
    g.add_argument(
        "--num-draft-tokens",
        type=int,
        default=None,
        metavar="K",
        help="tokens drafted per speculative round (default 4; needs --draft)",
    )
    return g


def check_pair_args(args, *, alone: str) -> None:
    """The checkpoints the scheme needs, reported by flag (the library would name its parameters). ``alone``: what
    --scheme base does without a value network ("decodes", "evaluates")."""
    if args.base is None and args.scheme != "value_only":
        raise UsageError("--base is required (the base model's checkpoint directory)")
    if args.value is None and args.scheme != "base":
        raise UsageError(f"--value is required (the value network's directory); --scheme base {alone} the base alone")
    if args.num_draft_tokens is not None and args.draft is None:
        raise UsageError("--num-draft-tokens needs --draft (the small base that drafts the tokens)")
    if args.num_draft_tokens is not None and args.num_draft_tokens < 1:
        raise UsageError(f"--num-draft-tokens must be >= 1, got {args.num_draft_tokens}")


def parse_terms(args) -> list[tuple]:
    """--term DIR WEIGHT pairs -> [(Path, float), ...] (UsageError naming the flag)."""
    out = []
    for d, w in args.term or []:
        try:
            weight = float(w)
        except ValueError:
            raise UsageError(f"--term {d} {w}: the weight must be a number") from None
        if not math.isfinite(weight):
            raise UsageError(f"--term {d} {w}: the weight must be finite")
        out.append((Path(d), weight))
    return out


def term_kwargs(args) -> dict:
    """from_pretrained's logit-term argument of the flags (none without --term)."""
    terms = parse_terms(args)
    return {"terms": terms} if terms else {}


def draft_kwargs(args) -> dict:
    """from_pretrained's speculative-decoding arguments of the flags (none without --draft)."""
    if args.draft is None:
        return {}
    return {"draft": args.draft, "num_draft_tokens": args.num_draft_tokens or 4}
