"""The IVL value-network training loop.

One optimizer step = one *global batch* = ``world_size x grad_accum`` length-grouped micro-batches. Every
micro-batch's loss is weighted by its share of the global batch's supervised tokens, so the gradient is the
same token-level mean however the global batch is split across processes or accumulation steps (1 process
with grad_accum=2 equals 2 DDP processes with grad_accum=1, up to float summation order).

Per micro-batch: frozen base hidden states (no grad) + value hidden states -> :func:`ivl_fast.ops.fused_ce_l1`
(never the [tokens, V] logits of either model). Schemes (paper, Figure 3):

- residual: the value network sees the tokens only;
- cascade:  its input embedding is softmax(z_base) @ E_value;
- cascade+: that plus the token embedding.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch

from ..chat import has_tokenizer, load_tokenizer
from ..models import LeanCausalLM, load_model, resolve_device
from ..models.checkpoint import read_config
from ..ops import fused_ce_l1
from .config import SCHEMES, TrainConfig
from .data import IGNORE, build_dataset, collate, make_batches, padding_fraction
from .run_dir import (
    CKPT,
    EXTENDABLE,
    LOG_FILE,
    check_out_dir,
    export,
    full_states,
    latest_checkpoint,
    load_checkpoint,
    read_run_file,
    replace_earlier_run,
    save_checkpoint,
    undo_fresh_run,
    write_run_file,
)
from .stop_request import StopRequest, TrainingInterrupted

__all__ = ["SCHEMES", "StepPlan", "TrainConfig", "TrainingInterrupted", "micro_batch_loss", "train_value_model"]


class StepPlan:
    """Which micro-batches make up each optimizer step of a stage.

    Every epoch reshuffles its length-grouped batches, so epochs may hold slightly different numbers of batches;
    each epoch contributes ``len(batches) // per_step`` full global batches (a trailing partial one is dropped)
    and steps run through the epochs in order.
    """

    def __init__(self, lengths: list[int], batch_tokens: int, seed: int, per_step: int):
        self.lengths, self.batch_tokens, self.seed, self.per_step = lengths, batch_tokens, seed, per_step
        self._cache: dict[int, list[list[int]]] = {}

    def batches(self, epoch: int) -> list[list[int]]:
        if epoch not in self._cache:
            if len(self._cache) > 4:
                self._cache.pop(next(iter(self._cache)))
            self._cache[epoch] = make_batches(self.lengths, self.batch_tokens, seed=self.seed, epoch=epoch)
        return self._cache[epoch]

    def epoch_steps(self, epoch: int) -> int:
        n = len(self.batches(epoch)) // self.per_step
        if n == 0:
            raise ValueError(
                f"the data make {len(self.batches(epoch))} micro-batches per epoch but one optimizer step needs "
                f"world_size x grad_accum = {self.per_step}; lower --grad-accum or --batch-tokens"
            )
        return n

    def steps_in_epochs(self, epochs: int) -> int:
        return sum(self.epoch_steps(e) for e in range(epochs))

    def group(self, step: int) -> tuple[int, list[list[int]]]:
        """(epoch, the per_step micro-batches) of the step-th optimizer step (0-based) of the stage."""
        epoch = 0
        while step >= (n := self.epoch_steps(epoch)):
            step -= n
            epoch += 1
        return epoch, self.batches(epoch)[step * self.per_step : (step + 1) * self.per_step]


# ----------------------------------------------------------------------------- distributed helpers
def _dist_setup(device: torch.device):
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, None
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), dist


def _lr_lambda(total: int, warmup: int):
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


# ----------------------------------------------------------------------------- the loss of one micro-batch
def micro_batch_loss(cfg: TrainConfig, value_fwd, value: LeanCausalLM, base: LeanCausalLM, batch: dict):
    """Un-normalised pieces: returns (mean loss over this micro-batch's supervised tokens, their count)."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    with torch.no_grad():
        base_h = base(ids, attention_mask=mask, output_hidden=True)  # [B, T, Hb]
    if cfg.scheme == "residual":
        value_h = value_fwd(ids, attention_mask=mask, output_hidden=True)
    else:  # cascade(+): the value network reads the base's next-token distribution
        with torch.no_grad():
            base_logits = torch.nn.functional.linear(base_h, base.head_weight())  # [B, T, V]
        embeds = value.soft_embed(base_logits, ids if cfg.scheme == "cascade+" else None)
        value_h = value_fwd(None, attention_mask=mask, output_hidden=True, inputs_embeds=embeds)
    hv, hb = value_h.shape[-1], base_h.shape[-1]
    lab = labels[:, 1:].reshape(-1)
    loss = fused_ce_l1(
        value_h[:, :-1].reshape(-1, hv),
        value.head_weight(),
        base_h[:, :-1].reshape(-1, hb),
        base.head_weight(),
        lab,
        cfg.l1,
        backend=cfg.loss_backend,
    )
    return loss, int((lab != IGNORE).sum())


def _optimizer_step(cfg, examples, group, pad_id, dist_info, value_fwd, value, base, opt, amp):
    """One global batch: forward/backward of this rank's micro-batches, clip, AdamW (the caller steps the
    schedule). Returns (the batch's mean loss over supervised tokens, the gradient norm, tokens read here)."""
    rank, world, dist = dist_info
    device = value.head_weight().device
    # token counts of the whole global batch (host-side, identical on every rank: no communication)
    counts = [sum(1 for i in b for x in examples[i].labels[1:] if x != IGNORE) for b in group]
    n_total = max(1, sum(counts))
    mine = list(range(rank, len(group), world))
    loss_sum, n_tok = torch.zeros((), device=device), 0
    for j, gi in enumerate(mine):
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in group[gi]], pad_id).items()}
        sync_ctx = value_fwd.no_sync() if (dist and j < len(mine) - 1 and not cfg.fsdp) else _null()
        with sync_ctx, amp or _null():
            loss, n_i = micro_batch_loss(cfg, value_fwd, value, base, batch)
            weighted = loss * (n_i / n_total) * world  # DDP averages over ranks
        weighted.backward()
        loss_sum += loss.detach() * (n_i / n_total)
        n_tok += int(batch["attention_mask"].sum())
    if dist:
        dist.all_reduce(loss_sum)
    grad_norm = torch.nn.utils.clip_grad_norm_(value.parameters(), cfg.max_grad_norm or float("inf"))
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss_sum), float(grad_norm), n_tok


# ----------------------------------------------------------------------------- resuming
def _resume_position(state: dict, cfg: TrainConfig, stage_steps: int, prior_run: dict, fp: dict) -> tuple[int, int]:
    """(step, stage) to continue from. A resumed run may be made longer or shorter (--max-steps, --epochs):
    the cosine schedule then follows the new length from the checkpoint's step on."""
    step, stage = int(state["step"]), int(state["stage"])
    same_flags = all(prior_run["config"].get(k) == fp[k] for k in EXTENDABLE)
    if same_flags or prior_run.get("stage_steps") == stage_steps:  # (e.g. --epochs changed under --max-steps)
        return step, stage
    n = len(cfg.bases)
    if n > 1 and stage > 0:
        raise ValueError(
            f"--resume with another --max-steps/--epochs: this curriculum's checkpoint is in stage {stage}; its "
            "length can change only during the first stage"
        )
    if step > stage_steps:
        raise ValueError(
            f"--resume: the checkpoint is at step {step}, past the new length of {stage_steps} steps per base"
        )
    return step, 1 if step == stage_steps else 0


def _follow_schedule(opt, sched) -> None:
    """Set each group's lr from the (possibly new) schedule at its current step (identical for an exact resume)."""
    for group, base_lr, lam in zip(opt.param_groups, sched.base_lrs, sched.lr_lambdas, strict=True):
        group["lr"] = base_lr * lam(sched.last_epoch)


# ----------------------------------------------------------------------------- the loop
def train_value_model(cfg: TrainConfig) -> dict:
    """Train; returns a summary dict (also in ``out/ivl.json``). See the module docstring.

    Nothing is written to ``cfg.out`` until the inputs are checked; a new run that fails before its first
    checkpoint removes what it wrote. Ctrl-C finishes the step, saves a checkpoint and raises
    :class:`TrainingInterrupted`.
    """
    cfg.validate()
    device = resolve_device(cfg.device)
    rank, world, dist = _dist_setup(device)
    out = Path(cfg.out)
    fp = cfg.fingerprint()
    prior_run = check_out_dir(cfg, out, fp) if rank == 0 else None
    if dist:
        dist.barrier()
        prior_run = read_run_file(out) if cfg.resume else None

    compute_dtype = cfg.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    tok_dir = cfg.value_init if has_tokenizer(cfg.value_init) else cfg.bases[0]
    if not has_tokenizer(tok_dir):
        raise FileNotFoundError(f"no tokenizer in --value-init {cfg.value_init!r} or --base {cfg.bases[0]!r}")
    tokenizer = load_tokenizer(tok_dir)
    value_vocab = int(read_config(cfg.value_init)["vocab_size"])
    for b in cfg.bases:
        bv = int(read_config(b)["vocab_size"])
        if bv != value_vocab:
            raise ValueError(
                f"base {b!r} has a {bv}-token vocabulary but the value network {cfg.value_init!r} has {value_vocab}; "
                "IVL training needs the same vocabulary"
            )

    data = build_dataset(tokenizer, cfg.data, max_length=cfg.max_length, drop_long=cfg.drop_long)
    lengths = [len(e.input_ids) for e in data.examples]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    per_step = world * cfg.grad_accum

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    # master weights in fp32; the forward runs under autocast on GPU
    value = load_model(cfg.value_init, device=device, dtype="float32", engine="lean", allow_pickle=cfg.allow_pickle)
    value.requires_grad_(True).train()
    value.gradient_checkpointing = cfg.grad_checkpointing
    value_fwd = value
    fsdp = bool(dist and cfg.fsdp)
    if cfg.fsdp and not dist:
        raise ValueError("--fsdp needs several processes: launch with torchrun --nproc_per_node N")
    if cfg.fsdp and cfg.scheme != "residual":
        raise ValueError(f"--fsdp supports the residual scheme only (got {cfg.scheme!r}); use DDP for cascade")
    if fsdp:
        # FSDP2: shard each decoder layer and the root. The root keeps its parameters unsharded after the
        # forward (reshard_after_forward=False) because the fused loss reads the LM head outside the forward.
        from torch.distributed.fsdp import fully_shard

        for layer in value.model.layers:
            fully_shard(layer)
        fully_shard(value, reshard_after_forward=False)
        value_fwd = value
    elif dist:
        from torch.nn.parallel import DistributedDataParallel as DDP

        value_fwd = DDP(value, device_ids=[device.index] if device.type == "cuda" else None)

    def make_optimizer():
        decay = [p for p in value.parameters() if p.dim() >= 2]
        no_decay = [p for p in value.parameters() if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        o = torch.optim.AdamW(groups, lr=cfg.lr)
        return o, torch.optim.lr_scheduler.LambdaLR(o, _lr_lambda(stage_steps, int(cfg.warmup_ratio * stage_steps)))

    plans = [StepPlan(lengths, cfg.batch_tokens, cfg.seed + 7919 * st, per_step) for st in range(len(cfg.bases))]
    stage_steps = cfg.max_steps or plans[0].steps_in_epochs(cfg.epochs)
    plans[0].group(0)  # the first step's batches exist (bad --batch-tokens / --grad-accum fail here, not later)
    total_steps = stage_steps * len(cfg.bases)
    opt, sched = make_optimizer()

    step, stage = 0, 0
    resumed_from = None
    ckpt = latest_checkpoint(out) if cfg.resume else None
    if ckpt is not None:
        st = load_checkpoint(ckpt, value, opt, sched, fsdp=fsdp)
        step, stage = _resume_position(st, cfg, stage_steps, prior_run, fp)
        _follow_schedule(opt, sched)
        resumed_from = step

    # the inputs are good: from here on --out is written
    created_dir = not out.exists()
    log_path = out / LOG_FILE
    run_record = {**(prior_run or {}), "config": fp, "data_hash": data.data_hash, "stage_steps": stage_steps}
    if rank == 0:
        if cfg.overwrite:
            replace_earlier_run(out)
        out.mkdir(parents=True, exist_ok=True)
        write_run_file(out, run_record)
        if resumed_from is not None and log_path.is_file():  # drop log lines past the checkpoint
            kept = [ln for ln in log_path.read_text().splitlines() if ln and json.loads(ln)["step"] <= resumed_from]
            log_path.write_text("".join(k + "\n" for k in kept))
        elif resumed_from is None:
            log_path.write_text("")

    from tqdm.auto import tqdm

    bar = tqdm(
        total=total_steps,
        initial=step,
        desc="train",
        unit="step",
        disable=not cfg.progress or rank != 0,
        file=sys.stderr,
    )
    amp = torch.autocast("cuda", dtype=getattr(torch, compute_dtype)) if device.type == "cuda" else None
    t_start, tokens_seen = time.perf_counter(), 0
    try:
        with StopRequest() as stop:
            while stage < len(cfg.bases):
                base = load_model(
                    cfg.bases[stage], device=device, dtype=compute_dtype, engine="lean", allow_pickle=cfg.allow_pickle
                )
                base.requires_grad_(False).eval()
                stage_start = stage * stage_steps
                if step == stage_start and stage > 0:  # a new curriculum stage restarts the schedule
                    opt, sched = make_optimizer()
                while step < stage_start + stage_steps:
                    epoch, group = plans[stage].group(step - stage_start)
                    t0 = time.perf_counter()
                    lr_used = opt.param_groups[0]["lr"]  # this step's lr (sched.step() below sets the next one's)
                    loss_val, grad_norm, n_tok = _optimizer_step(
                        cfg, data.examples, group, pad_id, (rank, world, dist), value_fwd, value, base, opt, amp
                    )
                    sched.step()
                    step += 1
                    tokens_seen += n_tok
                    if not math.isfinite(loss_val):
                        raise FloatingPointError(
                            f"loss became {loss_val} at step {step}; stopping (last checkpoint kept)"
                        )
                    dt = time.perf_counter() - t0
                    rec = {
                        "step": step,
                        "stage": stage,
                        "epoch": epoch,
                        "loss": loss_val,
                        "lr": lr_used,
                        "grad_norm": grad_norm,
                        "tokens": tokens_seen,
                        "tokens_per_s": sum(len(data.examples[i].input_ids) for b in group for i in b) / max(dt, 1e-9),
                    }
                    if rank == 0:
                        with log_path.open("a") as f:
                            f.write(json.dumps(rec) + "\n")
                        bar.set_postfix(loss=f"{loss_val:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}")
                        bar.update(1)
                    done_stage = step == stage_start + stage_steps
                    stopping = _agreed(stop.requested, dist, device)
                    if (cfg.save_every and (step % cfg.save_every == 0 or done_stage)) or stopping:
                        msd, osd = full_states(value, opt, fsdp=fsdp)  # every rank (collective under FSDP)
                        if rank == 0:
                            st = {"step": step, "stage": stage + (1 if done_stage else 0), "epoch": epoch}
                            save_checkpoint(out, msd, osd, sched, st)
                    if dist:
                        dist.barrier()
                    if stopping:
                        raise TrainingInterrupted(step, out / CKPT)
                    if cfg.debug_kill_at_step == step:
                        import signal

                        os.kill(os.getpid(), signal.SIGKILL)
                stage += 1
                del base
    except Exception:
        if rank == 0 and prior_run is None:  # a new run that failed: leave --out as it was, if nothing was saved
            undo_fresh_run(out, created_dir)
        raise
    finally:
        bar.close()

    summary = {
        "steps": step,
        "steps_run": step - (resumed_from or 0),
        "world_size": world,
        "data": data.stats.as_dict(),
        "padding_fraction": padding_fraction(plans[0].batches(0), lengths),
        "seconds": time.perf_counter() - t_start,
        "resumed_from": resumed_from,
    }
    final_sd, _ = full_states(value, opt, fsdp=fsdp, with_optimizer=False)
    if rank == 0:
        export(cfg, out, final_sd, tokenizer, run_record, summary)
    if dist:
        dist.barrier()
    return summary


def _agreed(flag: bool, dist, device) -> bool:
    """One rank's Ctrl-C stops every rank at the same step (a max all-reduce of the flag; no-op alone)."""
    if not dist:
        return flag
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
