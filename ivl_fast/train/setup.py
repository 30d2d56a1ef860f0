"""Setting up a training run before its first step, and the two objects the loop works on.

:class:`TrainRun` is what a run works with (built once by ``trainer._setup``, read-only afterwards);
:class:`RunState` is where it is (advanced by the loop, saved by :mod:`.checkpoint`). The pieces here check
the inputs and load the models; none of them writes to ``--out`` but :func:`prepare_out_dir`, which the
trainer calls once every input has been checked. Imports point one way: the trainer imports this module and
:mod:`.checkpoint`, which imports this one; nothing here imports either.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from ..chat import has_tokenizer, load_tokenizer
from ..models import LeanCausalLM, load_model
from ..models.checkpoint import read_config
from ..schemes import is_cascade
from .config import TrainConfig
from .data import Dataset
from .run_dir import (
    EXTENDABLE,
    LOG_FILE,
    check_out_dir,
    read_run_file,
    remove_stale_temps,
    replace_earlier_run,
    write_run_file,
)


class DistInfo(NamedTuple):
    """This process among the run's processes (torchrun's environment)."""

    rank: int
    world: int
    comm: object | None  # torch.distributed when there are several processes, None alone

    def barrier(self) -> None:
        if self.comm:
            self.comm.barrier()


@dataclass
class TrainRun:
    """What one run works with, every input checked; nothing here changes after setup.

    Attributes:
        cfg: the run's settings
        device: where the models run
        dist: this process's rank, the world size and torch.distributed (None alone)
        compute_dtype: the frozen bases' dtype (and the autocast's on GPU)
        amp: the forward's autocast context on GPU, None on CPU
        out: the run's directory (``cfg.out``)
        fp: ``cfg.fingerprint()``, the settings a resume must match
        prior_run: run.json of the run being resumed; None for a new run (whose failure undoes what it wrote)
        record: what run.json holds for this run (written at the start, completed by the export)
        tokenizer: the run's tokenizer (exported with the value network)
        data: the tokenized demonstrations and their statistics
        pad_id: the token id padding the micro-batches
        value: the trainable value network (float32 master weights)
        value_fwd: what runs its forward: the DDP wrapper, or ``value`` itself (alone, or sharded by FSDP)
        plans: one ``trainer.StepPlan`` per curriculum stage (its micro-batches per optimizer step)
        stage_steps: optimizer steps per stage
    """

    cfg: TrainConfig
    device: torch.device
    dist: DistInfo
    compute_dtype: str
    amp: object | None
    out: Path
    fp: dict
    prior_run: dict | None
    record: dict
    tokenizer: object
    data: Dataset
    pad_id: int
    value: LeanCausalLM
    value_fwd: torch.nn.Module
    plans: list
    stage_steps: int

    @property
    def fsdp(self) -> bool:
        """The value network is sharded (--fsdp under several processes)."""
        return bool(self.dist.comm and self.cfg.fsdp)


@dataclass
class RunState:
    """Where a run is; the loop advances it, a checkpoint saves it, a resume restores it.

    Attributes:
        opt: the current stage's AdamW (each curriculum stage starts a fresh one)
        sched: its warmup + cosine schedule
        step: optimizer steps done, over all stages
        stage: the current curriculum stage (index into ``cfg.bases``)
        resumed_from: the step this process resumed at (None: a new run from step 0)
        tokens_seen: tokens this process read since it started (the log's ``tokens``)
        epoch: the epoch of the last step
        saved_step: the step of the newest checkpoint on disk that this process wrote or resumed from
        drop_latest: the latest checkpoint is damaged (the run resumed from the previous one): the next save
            removes it instead of keeping it as the previous one
    """

    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    step: int = 0
    stage: int = 0
    resumed_from: int | None = None
    tokens_seen: int = 0
    epoch: int = 0
    saved_step: int | None = None
    drop_latest: bool = False


# ----------------------------------------------------------------------------- processes and --out
def init_distributed(device: torch.device) -> DistInfo:
    """Join torchrun's process group (nccl on GPU, gloo on CPU) when WORLD_SIZE > 1."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistInfo(0, 1, None)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), dist)


def check_out(cfg: TrainConfig, out: Path, fp: dict, dist: DistInfo) -> dict | None:
    """run.json of the run to resume (None: a new run). Rank 0 applies --out's rules (check_out_dir); every rank
    then reads the file it checked, so all of them resume the same run."""
    prior_run = check_out_dir(cfg, out, fp) if dist.rank == 0 else None
    if dist.comm:
        dist.barrier()
        prior_run = read_run_file(out) if cfg.resume else None
    return prior_run


def prepare_out_dir(cfg: TrainConfig, out: Path, record: dict, resumed_from: int | None) -> None:
    """Rank 0, once every input is checked: replace an earlier run (--overwrite), write run.json, and start the
    log (empty for a new run; a resumed one drops the lines past its checkpoint)."""
    log_path = out / LOG_FILE
    if cfg.overwrite:
        replace_earlier_run(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in remove_stale_temps(out):  # a killed run's half-written checkpoint or export file
        print(f"ivl-fast train: removed {name}, left half-written by a run that was killed", file=sys.stderr)
    write_run_file(out, record)
    if resumed_from is not None and log_path.is_file():
        kept = [ln for ln in log_path.read_text().splitlines() if ln and _log_step(log_path, ln) <= resumed_from]
        log_path.write_text("".join(k + "\n" for k in kept))
    elif resumed_from is None:
        log_path.write_text("")


def _log_step(log_path: Path, line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{log_path}: a line is not a step record ({line[:80]!r}); nothing was changed") from None


# ----------------------------------------------------------------------------- inputs and models
def load_checked_tokenizer(cfg: TrainConfig):
    """The run's tokenizer (--value-init's, else the first base's), after checking that every base shares the
    value network's vocabulary (IVL adds their logits token by token). One tokenizer under embeddings padded to
    other row counts (Qwen2.5 0.5B vs 7B) is one vocabulary: the loss then runs over the ids every model has a
    row for (``micro_batch_loss``), which the tokenizer's ids must fit in."""
    from ..tokenizer_identity import check_same_tokens, tokenizer_size

    tok_dir = cfg.value_init if has_tokenizer(cfg.value_init) else cfg.bases[0]
    if not has_tokenizer(tok_dir):
        raise FileNotFoundError(f"no tokenizer in --value-init {cfg.value_init!r} or --base {cfg.bases[0]!r}")
    tokenizer = load_tokenizer(tok_dir)
    value_vocab = int(read_config(cfg.value_init)["vocab_size"])
    for b in cfg.bases:
        bv = int(read_config(b)["vocab_size"])
        if bv == value_vocab:
            continue
        if min(bv, value_vocab) < tokenizer_size(tokenizer) or cfg.scheme != "residual":
            raise ValueError(
                f"base {b!r} has a {bv}-token vocabulary but the value network {cfg.value_init!r} has {value_vocab}"
                + (
                    f" and the tokenizer {tokenizer_size(tokenizer)} ids; IVL training needs the same vocabulary"
                    if cfg.scheme == "residual"
                    else f"; --scheme {cfg.scheme} needs the same row counts (it reads one model's rows in the other)"
                )
            )
        check_same_tokens(tokenizer, b, bv, f"base {b}")  # padded rows only: the tokens themselves must agree
    return tokenizer


def pad_token_id(tokenizer) -> int:
    """The id padding micro-batches: the pad token, else EOS (padding is masked out, so any id in range will do)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


def load_value(cfg: TrainConfig, device: torch.device, dist: DistInfo) -> tuple[LeanCausalLM, torch.nn.Module]:
    """(the value network, what runs its forward): float32 master weights (the forward runs under autocast on
    GPU), trainable, wrapped by DDP under several processes or sharded by FSDP2 with --fsdp."""
    if cfg.scheme == "probe":
        value = new_probe(cfg, device)
    else:
        value = load_model(cfg.value_init, device=device, dtype="float32", engine="lean", allow_pickle=cfg.allow_pickle)
        if value.config.multimodal is not None:  # the export writes the text model's weights only
            raise ValueError(
                f"--value-init {cfg.value_init}: a {value.config.multimodal} (multimodal) checkpoint cannot be trained "
                "as the value network; start from its text-only model (model_type gemma3_text)"
            )
    value.requires_grad_(True).train()
    value.gradient_checkpointing = cfg.grad_checkpointing
    if cfg.fsdp and not dist.comm:
        raise ValueError("--fsdp needs several processes: launch with torchrun --nproc_per_node N")
    if cfg.fsdp and is_cascade(cfg.scheme):
        raise ValueError(f"--fsdp supports the residual scheme only (got {cfg.scheme!r}); use DDP for cascade")
    if cfg.fsdp and device.type != "cuda" and torch.__version__ < "2.6":
        # torch 2.5's FSDP2 raises "FSDP requires CUDA for streams" at the first forward on any other device
        raise ValueError(
            f"--fsdp on {device.type} needs torch >= 2.6 (torch {torch.__version__}'s FSDP2 runs on CUDA only); "
            "leave out --fsdp (DDP) or upgrade torch"
        )
    if cfg.fsdp:
        # FSDP2: shard each decoder layer and the root. The root keeps its parameters unsharded after the
        # forward (reshard_after_forward=False) because the fused loss reads the LM head outside the forward.
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # torch 2.5: FSDP2 was still under torch.distributed._composable
            from torch.distributed._composable.fsdp import fully_shard

        for layer in value.model.layers:
            fully_shard(layer)
        fully_shard(value, reshard_after_forward=False)
        return value, value
    if dist.comm:
        from torch.nn.parallel import DistributedDataParallel as DDP

        return value, DDP(value, device_ids=[device.index] if device.type == "cuda" else None)
    return value, value


def new_probe(cfg: TrainConfig, device: torch.device):
    """A fresh probe value model sized by ``cfg.value_init``'s config (seeded); its head starts at zero, so the
    run starts from the base itself (z_post = z_base)."""
    from ..models.probe import ProbeValue

    raw = read_config(cfg.value_init)
    width = cfg.probe_intermediate_size or int(raw.get("intermediate_size") or 4 * raw["hidden_size"])
    for b in cfg.bases:  # every base of a curriculum must have the width and vocabulary the probe reads
        rb = read_config(b)
        if (rb.get("hidden_size"), rb.get("vocab_size")) != (raw.get("hidden_size"), raw.get("vocab_size")):
            raise ValueError(
                f"--scheme probe: base {b} has hidden size {rb.get('hidden_size')} and vocabulary "
                f"{rb.get('vocab_size')}, --value-init {cfg.value_init} has {raw.get('hidden_size')} and "
                f"{raw.get('vocab_size')}: a probe reads one base width"
            )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        probe = ProbeValue(int(raw["hidden_size"]), width, int(raw["vocab_size"]))
    torch.nn.init.zeros_(probe.lm_head.weight)
    return probe.to(device=device, dtype=torch.float32)


def load_base(run: TrainRun, stage: int) -> LeanCausalLM:
    """The frozen base of a curriculum stage, in the compute dtype."""
    cfg = run.cfg
    base = load_model(
        cfg.bases[stage], device=run.device, dtype=run.compute_dtype, engine="lean", allow_pickle=cfg.allow_pickle
    )
    return base.requires_grad_(False).eval()


# ----------------------------------------------------------------------------- resuming
def resume_position(saved: dict, run: TrainRun) -> tuple[int, int]:
    """(step, stage) to continue from, given a checkpoint's saved position. A resumed run may be made longer or
    shorter (--max-steps, --epochs): the cosine schedule then follows the new length from the checkpoint's step on."""
    step, stage = int(saved["step"]), int(saved["stage"])
    same_flags = all(run.prior_run["config"].get(k) == run.fp[k] for k in EXTENDABLE)
    if same_flags or run.prior_run.get("stage_steps") == run.stage_steps:  # (e.g. --epochs changed under --max-steps)
        return step, stage
    if len(run.cfg.bases) > 1 and stage > 0:
        raise ValueError(
            f"--resume with another --max-steps/--epochs: this curriculum's checkpoint is in stage {stage}; its "
            "length can change only during the first stage"
        )
    if step > run.stage_steps:
        raise ValueError(
            f"--resume: the checkpoint is at step {step}, past the new length of {run.stage_steps} steps per base"
        )
    return step, 1 if step == run.stage_steps else 0
