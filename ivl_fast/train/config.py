"""The settings of a value-network training run (``ivl-fast train``'s flags, one field each)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

SCHEMES = ("residual", "cascade", "cascade+")


@dataclass
class TrainConfig:
    """Defaults follow the paper's Table 5 (AdamW, lr 1e-4, warmup 0.04, cosine, 3 epochs, lambda 1, 4096)."""

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
    dtype: str | None = None  # base/compute dtype; default bf16 on GPU, fp32 on CPU
    loss_backend: str = "auto"
    fsdp: bool = False
    progress: bool = True
    allow_pickle: bool = False
    # testing aid: SIGKILL this process right after finishing this optimizer step (simulates a crash)
    debug_kill_at_step: int | None = field(default=None, repr=False)

    def validate(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {SCHEMES}, got {self.scheme!r}")
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
