"""`ivl-fast train`: a value network on a frozen base; Ctrl-C saves a checkpoint and prints how to resume."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from ..schemes import TRAIN_SCHEMES
from .errors import DefaultsHelp


def add_parser(sub) -> None:
    tr = sub.add_parser(
        "train", help="train a value network on a frozen base from chat demonstrations", formatter_class=DefaultsHelp
    )
    req = tr.add_argument_group("required")
    req.add_argument(
        "--base", type=Path, action="append", required=True, help="frozen base; repeat for a curriculum (in order)"
    )
    req.add_argument(
        "--value-init", type=Path, required=True, help="initial value network (normally the small base itself)"
    )
    req.add_argument("--data", type=Path, required=True, help="JSON/JSONL demonstrations (ShareGPT or OpenAI form)")
    req.add_argument("--out", type=Path, required=True, help="new directory for the value network and checkpoints")
    tr.add_argument("--l1", type=float, default=1.0, help="L1 weight on the value logits (0 = plain IVL)")
    tr.add_argument("--scheme", default="residual", choices=TRAIN_SCHEMES, help="value network input")
    tr.add_argument("--lr", type=float, default=1e-4, help="AdamW peak learning rate")
    tr.add_argument("--warmup-ratio", type=float, default=0.04, help="share of the steps spent warming up")
    tr.add_argument("--epochs", type=int, default=3, help="passes over the data per base")
    tr.add_argument("--max-steps", type=int, default=None, help="optimizer steps per base (overrides --epochs)")
    tr.add_argument("--batch-tokens", type=int, default=16384, help="tokens per micro-batch, padding included")
    tr.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (per process)")
    tr.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: none)")
    tr.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (matrices only)")
    tr.add_argument("--seed", type=int, default=0, help="seed of the data order and the RNGs")
    tr.add_argument("--max-length", type=int, default=4096, help="tokens per conversation at most")
    tr.add_argument("--drop-long", action="store_true", help="drop over-long conversations instead of truncating")
    tr.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in the backward")
    tr.add_argument("--save-every", type=int, default=200, help="checkpoint every N steps (0: only on Ctrl-C)")
    tr.add_argument("--resume", action="store_true", help="continue the run in --out (may change its length)")
    tr.add_argument("--overwrite", action="store_true", help="replace an earlier ivl-fast run in --out (nothing else)")
    tr.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    tr.add_argument("--dtype", default=None, help="compute dtype (default bf16 on GPU, fp32 on CPU)")
    tr.add_argument(
        "--loss-backend", default="auto", choices=["auto", "triton", "torch"], help="fused CE+L1 implementation"
    )
    tr.add_argument("--fsdp", action="store_true", help="shard the value network with FSDP (under torchrun)")
    tr.add_argument(
        "--probe-intermediate-size",
        type=int,
        default=None,
        help="--scheme probe: the MLP width of the probe (default: --value-init's intermediate_size)",
    )
    tr.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    tr.add_argument("--allow-pickle", action="store_true", help="allow loading pickled .bin checkpoints (unsafe)")
    tr.add_argument("--debug-kill-at-step", type=int, default=None, help=argparse.SUPPRESS)
    tr.set_defaults(func=run)


def run(args) -> int:
    from ..train import TrainConfig, train_value_model

    cfg = TrainConfig.from_args(args)  # one field per flag; the renames are in ivl_fast.train.config.CLI_DESTS
    try:
        summary = train_value_model(cfg)
    except KeyboardInterrupt:
        _report_interrupted_training(args)
        return 130
    d = summary["data"]
    steps = f"trained {summary['steps_run']} steps"
    if summary["resumed_from"] is not None:
        steps += f" (resumed at step {summary['resumed_from']}, now at step {summary['steps']})"
    print(
        f"{steps} in {summary['seconds']:.1f} s on {d['used']} conversations "
        f"({d['skipped_no_assistant']} without an assistant turn skipped, {d['truncated']} truncated, "
        f"{d['dropped_too_long']} dropped); padding {100 * summary['padding_fraction']:.1f}%; "
        f"value network: {args.out}",
        file=sys.stderr,
    )
    return 0


def _report_interrupted_training(args) -> None:
    """Ctrl-C: say which checkpoint is the latest and print the command that continues from it."""
    from ..train.run_dir import checkpoint_step, latest_checkpoint

    out = Path(args.out)
    ckpt = latest_checkpoint(out) if out.is_dir() else None
    if ckpt is None:
        print("ivl-fast train: interrupted before the first checkpoint; nothing to resume", file=sys.stderr)
        return
    argv = [a for a in args.argv if a not in ("--overwrite", "--resume")]
    resume = shlex.join(["ivl-fast", *argv, "--resume"])
    print(
        f"ivl-fast train: interrupted; latest checkpoint {str(ckpt)!r} at step {checkpoint_step(ckpt)}. "
        f"Continue with:\n  {resume}",
        file=sys.stderr,
    )
