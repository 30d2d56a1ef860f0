"""The settings of a value-network training run (``ivl-fast train``'s flags, one field each)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path

from ..schemes import TRAIN_SCHEMES, check_scheme

SCHEMES = TRAIN_SCHEMES  # the name this package exported before ivl_fast.schemes existed


def _strs(paths) -> list[str]:
    return [str(p) for p in paths]


def _not(flag: bool) -> bool:
    return not flag


# How ``ivl-fast train``'s parsed namespace becomes a TrainConfig (TrainConfig.from_args), in one place: a flag's
# dest is the field of the same name, taking the parsed value as it is, unless it is listed in CLI_DESTS.
# tests/test_train_config.py checks the parser against these: every dest maps to a field, every field has a flag.
CLI_DESTS = {  # dest -> (field, what turns the parsed value into the field's)
    "base": ("bases", _strs),  # --base DIR, repeated
    "value_init": ("value_init", str),  # the parser reads paths as Path, the config keeps str
    "data": ("data", str),
    "out": ("out", str),
    "no_progress": ("progress", _not),
}
NOT_SETTINGS = ("command", "func", "argv")  # what the cli package adds to every namespace: no setting of the run
NO_FLAG = ()  # fields that no flag sets (the Python API only); none so far


@dataclass
class TrainConfig:
    """The settings of one run, one ``ivl-fast train`` flag each (the field's name with dashes; ``bases`` is the
    repeated --base, ``progress`` is --no-progress inverted). Defaults follow the paper's Table 5 (AdamW, lr 1e-4,
    warmup 0.04, cosine, 3 epochs, lambda 1, 4096 tokens).

    Attributes:
        bases: frozen base checkpoint directories, trained on in turn (several: a curriculum, one stage each)
        value_init: the initial value network (normally the small base itself); its tokenizer, else the first base's,
            is the run's
        data: JSON/JSONL chat demonstrations (ShareGPT or OpenAI form)
        out: the run's directory: checkpoints, log, the exported value network
        l1: weight of the L1 penalty on the value logits (0: plain IVL)
        scheme: the value network's input, one of TRAIN_SCHEMES (:mod:`ivl_fast.schemes`)
            ("probe": no network over the tokens, the Llama MLP on the base's final hidden state; then value_init
            only sizes it: its hidden and vocabulary sizes must be the bases', normally it is the base itself)
        lr: AdamW's peak learning rate
        warmup_ratio: share of each stage's steps spent warming up linearly (then cosine to 0)
        epochs: passes over the data per base (ignored when max_steps is set)
        max_steps: optimizer steps per base; overrides epochs
        batch_tokens: tokens per micro-batch, padding included
        grad_accum: micro-batches per optimizer step and process
        max_grad_norm: gradient clipping threshold (0: no clipping)
        weight_decay: AdamW weight decay, on matrices only
        seed: seed of the data order and of the RNGs
        max_length: tokens per conversation at most
        drop_long: drop over-long conversations instead of truncating them
        grad_checkpointing: recompute the value network's activations in the backward
        save_every: checkpoint every N optimizer steps and at each stage's end (0: only on Ctrl-C)
        resume: continue the run in out (its length may change: EXTENDABLE in :mod:`.run_dir`)
        overwrite: replace an earlier ivl-fast run in out (nothing else)
        device: cpu, cuda, cuda:1 ... (None: cuda if available)
        dtype: compute dtype: the frozen bases' weights and, on GPU, the forward's autocast (None: bfloat16 on GPU,
            float32 on CPU); the value network's master weights stay float32
        loss_backend: fused CE+L1 implementation: auto, triton or torch
        fsdp: shard the value network with FSDP (several processes, residual scheme only)
        probe_intermediate_size: the probe's MLP width (default: value_init's intermediate_size)
        progress: a progress bar on stderr (rank 0)
        allow_pickle: allow loading pickled .bin checkpoints (unsafe)
        debug_kill_at_step: testing aid: SIGKILL this process right after this optimizer step (simulates a crash)
    """

    bases: list[str]
    value_init: str
    data: str
    out: str
    l1: float = 1.0
    scheme: str = "residual"
    lr: float = 1e-4
    warmup_ratio: float = 0.04
    epochs: int = 3
    max_steps: int | None = None
    batch_tokens: int = 16384
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    seed: int = 0
    max_length: int = 4096
    drop_long: bool = False
    grad_checkpointing: bool = False
    save_every: int = 200
    resume: bool = False
    overwrite: bool = False
    device: str | None = None
    dtype: str | None = None
    loss_backend: str = "auto"
    fsdp: bool = False
    probe_intermediate_size: int | None = None
    progress: bool = True
    allow_pickle: bool = False
    debug_kill_at_step: int | None = field(default=None, repr=False)

    @classmethod
    def from_args(cls, args) -> TrainConfig:
        """The config of a parsed ``ivl-fast train`` namespace (see CLI_DESTS for the dests that are renamed or
        converted). A dest that maps to no field is a TypeError: a new flag must reach the config or be listed."""
        names = {f.name for f in fields(cls)}
        kw = {}
        for dest, value in vars(args).items():
            if dest in NOT_SETTINGS:
                continue
            name, convert = CLI_DESTS.get(dest, (dest, None))
            if name not in names:
                raise TypeError(f"ivl-fast train's {dest!r} is no TrainConfig field (map it in CLI_DESTS)")
            kw[name] = convert(value) if convert else value
        return cls(**kw)

    def validate(self) -> None:
        check_scheme(self.scheme, TRAIN_SCHEMES)
        if self.probe_intermediate_size is not None and self.scheme != "probe":
            raise ValueError("--probe-intermediate-size (probe_intermediate_size) needs --scheme probe")
        if self.probe_intermediate_size is not None and self.probe_intermediate_size < 1:
            raise ValueError(f"--probe-intermediate-size must be >= 1, got {self.probe_intermediate_size}")
        if self.scheme == "probe" and self.fsdp:
            raise ValueError("--fsdp supports the residual scheme only (got 'probe'); use DDP for a probe")
        if not self.bases:
            raise ValueError("at least one base (--base DIR) is required")
        checks = [  # (field, holds, what it must be); errors name the CLI flag and the field
            ("lr", self.lr > 0, "> 0"),
            ("warmup_ratio", 0 <= self.warmup_ratio < 1, "in [0, 1)"),
            ("epochs", self.epochs >= 1, ">= 1"),
            ("max_steps", self.max_steps is None or self.max_steps >= 1, ">= 1"),
            ("batch_tokens", self.batch_tokens >= 1, ">= 1"),
            ("grad_accum", self.grad_accum >= 1, ">= 1"),
            ("max_grad_norm", self.max_grad_norm >= 0, ">= 0 (0 disables clipping)"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("max_length", self.max_length >= 2, ">= 2"),
            ("l1", self.l1 >= 0 and math.isfinite(self.l1), "finite and >= 0"),
            ("save_every", self.save_every >= 0, ">= 0 (0: never)"),
        ]
        for name, ok, want in checks:
            if not ok:
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{flag} ({name}) must be {want}, got {getattr(self, name)!r}")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite exclude each other")

    def fingerprint(self) -> dict:
        """The settings that define a run (a resumed run must match them, except its length: EXTENDABLE)."""
        keep = (
            "bases value_init l1 scheme lr warmup_ratio epochs max_steps batch_tokens grad_accum "
            "max_grad_norm weight_decay seed max_length drop_long"
        ).split()
        d = {k: getattr(self, k) for k in keep}
        d["bases"] = [str(Path(b).resolve()) for b in self.bases]
        d["value_init"] = str(Path(self.value_init).resolve())
        return d
