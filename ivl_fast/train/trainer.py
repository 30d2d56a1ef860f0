"""The IVL value-network training loop.

One optimizer step = one *global batch* = ``world_size x grad_accum`` length-grouped micro-batches. Every
micro-batch's loss is weighted by its share of the global batch's supervised tokens, so the gradient is the
same token-level mean however the global batch is split across processes or accumulation steps (1 process
with grad_accum=2 equals 2 DDP processes with grad_accum=1, up to float summation order).

Per micro-batch: frozen base hidden states (no grad) + value hidden states -> :func:`ivl_fast.ops.fused_ce_l1`
(never the [tokens, V] logits of either model). The schemes (paper, Figure 3) are :mod:`ivl_fast.schemes`'s.

The run, top down: :func:`train_value_model` is the loop; :func:`_setup` and :func:`_start` build the run
(:class:`~.setup.TrainRun`) and its position (:class:`~.setup.RunState`) from :mod:`.setup`'s pieces;
:func:`_train_stage` runs one curriculum stage, :func:`_train_step` one optimizer step of it (the gradient work
in :func:`_optimizer_step`); :mod:`.checkpoint` saves. Here too: the step plan, the schedule and the loss.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import time
from pathlib import Path

import torch

from ..models import LeanCausalLM, resolve_device
from ..ops import fused_ce_l1
from ..schemes import is_cascade
from .checkpoint import checkpoint_due, finish, save_run_checkpoint
from .config import SCHEMES, TrainConfig
from .data import IGNORE, build_dataset, collate, make_batches
from .run_dir import CKPT, LOG_FILE, choose_checkpoint, load_checkpoint, undo_fresh_run
from .setup import (
    RunState,
    TrainRun,
    check_out,
    init_distributed,
    load_base,
    load_checked_tokenizer,
    load_value,
    pad_token_id,
    prepare_out_dir,
    resume_position,
)
from .stop_request import StopRequest, TrainingInterrupted

__all__ = ["SCHEMES", "StepPlan", "TrainConfig", "TrainingInterrupted", "micro_batch_loss", "train_value_model"]


# ----------------------------------------------------------------------------- the loop
def train_value_model(cfg: TrainConfig) -> dict:
    """Train; returns a summary dict (also in ``out/ivl.json``). See the module docstring.

    Nothing is written to ``cfg.out`` until the inputs are checked; a new run that fails before its first
    checkpoint removes what it wrote. Ctrl-C finishes the step, saves a checkpoint and raises
    :class:`TrainingInterrupted`.
    """
    cfg.validate()
    run = _setup(cfg)
    state = _start(run)
    # the inputs are good: from here on --out is written
    created_dir = not run.out.exists()
    if run.dist.rank == 0:
        prepare_out_dir(cfg, run.out, run.record, state.resumed_from)
    bar = _progress_bar(run, state)
    t_start = time.perf_counter()
    try:
        with StopRequest() as stop:
            while state.stage < len(cfg.bases):
                _train_stage(run, state, stop, bar)
    except Exception:
        if run.dist.rank == 0 and run.prior_run is None:  # a new run that failed: leave --out as it was, if unsaved
            undo_fresh_run(run.out, created_dir)
        raise
    finally:
        bar.close()
    return finish(run, state, time.perf_counter() - t_start)


def _setup(cfg: TrainConfig) -> TrainRun:
    """Everything the run works with, checked in this order and nothing written yet: the processes, --out's rules
    (and the run to resume), the tokenizer and vocabularies, the data, the value network, each stage's step plan."""
    device = resolve_device(cfg.device)
    dist = init_distributed(device)
    out, fp = Path(cfg.out), cfg.fingerprint()
    prior_run = check_out(cfg, out, fp, dist)
    compute_dtype = cfg.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    tokenizer = load_checked_tokenizer(cfg)
    data = build_dataset(tokenizer, cfg.data, max_length=cfg.max_length, drop_long=cfg.drop_long)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    value, value_fwd = load_value(cfg, device, dist)
    lengths = [len(e.input_ids) for e in data.examples]
    per_step = dist.world * cfg.grad_accum
    plans = [StepPlan(lengths, cfg.batch_tokens, cfg.seed + 7919 * st, per_step) for st in range(len(cfg.bases))]
    stage_steps = cfg.max_steps or plans[0].steps_in_epochs(cfg.epochs)
    plans[0].group(0)  # the first step's batches exist (bad --batch-tokens / --grad-accum fail here, not later)
    return TrainRun(
        cfg=cfg,
        device=device,
        dist=dist,
        compute_dtype=compute_dtype,
        amp=torch.autocast("cuda", dtype=getattr(torch, compute_dtype)) if device.type == "cuda" else None,
        out=out,
        fp=fp,
        prior_run=prior_run,
        record={**(prior_run or {}), "config": fp, "data_hash": data.data_hash, "stage_steps": stage_steps},
        tokenizer=tokenizer,
        data=data,
        pad_id=pad_token_id(tokenizer),
        value=value,
        value_fwd=value_fwd,
        plans=plans,
        stage_steps=stage_steps,
    )


def _start(run: TrainRun) -> RunState:
    """The first stage's optimizer and schedule at step 0, or, with --resume, at the latest checkpoint: its weights,
    optimizer, schedule and RNGs loaded, the schedule then following the run's (possibly new) length."""
    state = RunState(*_make_optimizer(run.value, run.cfg, run.stage_steps))
    if run.cfg.resume:  # the latest checkpoint, checked against its checksums; the previous one if it is damaged
        ckpt, saved, skipped = choose_checkpoint(run.out)
        if run.dist.rank == 0:
            for why in skipped:
                print(f"ivl-fast train: {why}; resuming from the previous checkpoint, {ckpt.name}", file=sys.stderr)
            if not saved["verified"]:
                print(f"ivl-fast train: {ckpt.name} predates checksums: its files are not verified", file=sys.stderr)
        load_checkpoint(ckpt, saved, run.value, state.opt, state.sched, fsdp=run.fsdp)
        state.step, state.stage = resume_position(saved, run)
        _follow_schedule(state.opt, state.sched)
        state.resumed_from = state.saved_step = state.step
        state.epoch, state.drop_latest = int(saved["epoch"]), bool(skipped)
    return state


def _progress_bar(run: TrainRun, state: RunState):
    """Steps over all stages on stderr, from where the run starts; rank 0 only, off with --no-progress."""
    from tqdm.auto import tqdm

    return tqdm(
        total=run.stage_steps * len(run.cfg.bases),
        initial=state.step,
        desc="train",
        unit="step",
        disable=not run.cfg.progress or run.dist.rank != 0,
        file=sys.stderr,
    )


def _train_stage(run: TrainRun, state: RunState, stop: StopRequest, bar) -> None:
    """The current curriculum stage from ``state.step`` to its end: its frozen base, a fresh optimizer and schedule
    if the stage starts here (not when resumed inside it), then each step, checkpointed when due. Ctrl-C (``stop``)
    ends the run after the step it interrupts, with a checkpoint (TrainingInterrupted)."""
    cfg = run.cfg
    base = load_base(run, state.stage)  # freed when the stage returns, before the next stage loads its own
    stage_start = state.stage * run.stage_steps
    stage_end = stage_start + run.stage_steps
    if state.step == stage_start and state.stage > 0:  # a new curriculum stage restarts the schedule
        state.opt, state.sched = _make_optimizer(run.value, cfg, run.stage_steps)
    while state.step < stage_end:
        state.epoch = _train_step(run, state, base, bar)
        done_stage = state.step == stage_end
        stopping = _agreed(stop.requested, run.dist.comm, run.device)
        if checkpoint_due(run, state, done_stage, stopping):
            save_run_checkpoint(run, state, done_stage)
        run.dist.barrier()
        if stopping:
            raise TrainingInterrupted(state.step, run.out / CKPT)
        if cfg.debug_kill_at_step == state.step:
            os.kill(os.getpid(), signal.SIGKILL)
    state.stage += 1


def _train_step(run: TrainRun, state: RunState, base: LeanCausalLM, bar) -> int:
    """The optimizer step after ``state.step`` (its micro-batches via :func:`_optimizer_step`, then the schedule's
    step), its line in train_log.jsonl and the progress bar; returns its epoch. A non-finite loss stops the run."""
    epoch, group = run.plans[state.stage].group(state.step - state.stage * run.stage_steps)
    t0 = time.perf_counter()
    lr_used = state.opt.param_groups[0]["lr"]  # this step's lr (sched.step() below sets the next one's)
    loss_val, grad_norm, n_tok = _optimizer_step(
        run.cfg, run.data.examples, group, run.pad_id, run.dist, run.value_fwd, run.value, base, state.opt, run.amp
    )
    state.sched.step()
    state.step += 1
    state.tokens_seen += n_tok
    if not math.isfinite(loss_val):
        raise FloatingPointError(f"loss became {loss_val} at step {state.step}; stopping (last checkpoint kept)")
    dt = time.perf_counter() - t0
    rec = {
        "step": state.step,
        "stage": state.stage,
        "epoch": epoch,
        "loss": loss_val,
        "lr": lr_used,
        "grad_norm": grad_norm,
        "tokens": state.tokens_seen,
        "tokens_per_s": sum(len(run.data.examples[i].input_ids) for b in group for i in b) / max(dt, 1e-9),
    }
    if run.dist.rank == 0:
        with (run.out / LOG_FILE).open("a") as f:
            f.write(json.dumps(rec) + "\n")
        bar.set_postfix(loss=f"{loss_val:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}")
        bar.update(1)
    return epoch


# ----------------------------------------------------------------------------- step plan, schedule, loss, step
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


def _lr_lambda(total: int, warmup: int):
    """The schedule's lr factor at each step of a stage of ``total`` steps: linear warmup, then cosine to 0."""

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def _make_optimizer(value: LeanCausalLM, cfg: TrainConfig, stage_steps: int):
    """A fresh AdamW (weight decay on matrices only) and its warmup + cosine schedule over one stage."""
    decay = [p for p in value.parameters() if p.dim() >= 2]
    no_decay = [p for p in value.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(stage_steps, int(cfg.warmup_ratio * stage_steps)))


def logit_transform(model) -> tuple[float, float | None]:
    """(logit multiplier, final soft-cap) of a lean-family model (Granite's 1 / logits_scaling, Gemma 2's cap);
    (1.0, None) for a model without them (a probe). The multiplier is folded into the hidden states (the head is
    linear), the cap goes to the fused loss."""
    arch = getattr(getattr(model, "config", None), "arch", None)
    return (1.0, None) if arch is None else (arch.logit_scale, arch.final_softcap)


def micro_batch_loss(cfg: TrainConfig, value_fwd, value: LeanCausalLM, base: LeanCausalLM, batch: dict):
    """Un-normalised pieces: returns (mean loss over this micro-batch's supervised tokens, their count)."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    with torch.no_grad():
        base_h = base(ids, attention_mask=mask, output_hidden=True)  # [B, T, Hb]
    if cfg.scheme == "probe":  # the probe reads the base's final hidden states
        value_h = value_fwd(base_h)
    elif not is_cascade(cfg.scheme):  # residual: the value network reads the tokens
        value_h = value_fwd(ids, attention_mask=mask, output_hidden=True)
    else:  # cascade(+): the value network reads the base's next-token distribution
        with torch.no_grad():
            base_logits = base.project(base_h)  # [B, T, V] (the family's logit transform included)
        embeds = value.soft_embed(base_logits, ids if cfg.scheme == "cascade+" else None)
        value_h = value_fwd(None, attention_mask=mask, output_hidden=True, inputs_embeds=embeds)
    hv, hb = value_h.shape[-1], base_h.shape[-1]
    lab = labels[:, 1:].reshape(-1)
    (value_scale, value_cap), (base_scale, base_cap) = logit_transform(value), logit_transform(base)
    # embeddings padded to other row counts (one tokenizer, load_checked_tokenizer): the rows both models have;
    # row slices of the heads, no copy; the larger model's padding rows get probability 0 and no gradient
    v = min(value.head_weight().shape[0], base.head_weight().shape[0])
    loss = fused_ce_l1(
        value_h[:, :-1].reshape(-1, hv) * value_scale if value_scale != 1.0 else value_h[:, :-1].reshape(-1, hv),
        value.head_weight()[:v],
        base_h[:, :-1].reshape(-1, hb) * base_scale if base_scale != 1.0 else base_h[:, :-1].reshape(-1, hb),
        base.head_weight()[:v],
        lab,
        cfg.l1,
        backend=cfg.loss_backend,
        value_softcap=value_cap,
        base_softcap=base_cap,
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


def _follow_schedule(opt, sched) -> None:
    """Set each group's lr from the (possibly new) schedule at its current step (identical for an exact resume)."""
    for group, base_lr, lam in zip(opt.param_groups, sched.base_lrs, sched.lr_lambdas, strict=True):
        group["lr"] = base_lr * lam(sched.last_epoch)


# ----------------------------------------------------------------------------- helpers
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
