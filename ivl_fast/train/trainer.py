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

import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..chat import has_tokenizer, load_tokenizer
from ..models import LeanCausalLM, load_model, resolve_device
from ..models.checkpoint import read_config
from ..ops import fused_ce_l1
from .data import IGNORE, build_dataset, collate, make_batches, padding_fraction

SCHEMES = ("residual", "cascade", "cascade+")
CKPT = "checkpoint"
STATE_FILE = "trainer_state.json"


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
        checks = [
            ("lr", self.lr > 0),
            ("warmup_ratio", 0 <= self.warmup_ratio < 1),
            ("epochs", self.epochs >= 1),
            ("max_steps", self.max_steps is None or self.max_steps >= 1),
            ("batch_tokens", self.batch_tokens >= 1),
            ("grad_accum", self.grad_accum >= 1),
            ("max_grad_norm", self.max_grad_norm >= 0),
            ("weight_decay", self.weight_decay >= 0),
            ("max_length", self.max_length >= 2),
            ("l1", self.l1 >= 0 and math.isfinite(self.l1)),
            ("save_every", self.save_every >= 0),
        ]
        for name, ok in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is out of range")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite exclude each other")

    def fingerprint(self) -> dict:
        """The settings that define a run (a resumed run must match them)."""
        keep = (
            "bases value_init l1 scheme lr warmup_ratio epochs max_steps batch_tokens grad_accum "
            "max_grad_norm weight_decay seed max_length drop_long"
        ).split()
        d = {k: getattr(self, k) for k in keep}
        d["bases"] = [str(Path(b).resolve()) for b in self.bases]
        d["value_init"] = str(Path(self.value_init).resolve())
        return d


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


def _check_out_dir(cfg: TrainConfig, out: Path, fp: dict) -> None:
    if not out.exists() or not any(out.iterdir()):
        if cfg.resume:
            raise FileNotFoundError(f"--resume: {str(out)!r} holds no run to resume")
        return
    run_file = out / "run.json"
    if cfg.overwrite:
        shutil.rmtree(out)
        return
    if not cfg.resume:
        raise FileExistsError(
            f"--out {str(out)!r} already holds files (a previous run?); pass --resume to continue it or "
            "--overwrite to replace it"
        )
    if not run_file.is_file():
        raise FileExistsError(f"--resume: {str(out)!r} holds files but no run.json: not an ivl-fast training run")
    old = json.loads(run_file.read_text())["config"]
    diff = {k: (old.get(k), v) for k, v in fp.items() if old.get(k) != v}
    if diff:
        raise ValueError(f"--resume: {str(out)!r} holds a different run; settings differ: {diff}")


def _latest_checkpoint(out: Path) -> Path | None:
    for name in (CKPT, f".{CKPT}.old"):  # .old survives a crash in the middle of a swap
        p = out / name
        if (p / STATE_FILE).is_file():
            return p
    return None


def _sd_options(fsdp: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True) if fsdp else StateDictOptions()


def full_states(value, opt, *, fsdp: bool, with_optimizer: bool = True):
    """Unsharded model (and optimizer) state dicts; collective under FSDP, so call it on every rank."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    o = _sd_options(fsdp)
    msd = {k: v.detach().contiguous() for k, v in get_model_state_dict(value, options=o).items()}
    osd = get_optimizer_state_dict(value, opt, options=o) if with_optimizer else None
    return msd, osd


def save_checkpoint(out: Path, model_sd: dict, opt_sd: dict, sched, state: dict) -> Path:
    """Write weights + optimizer + scheduler + RNG + data position atomically (temp dir, then rename).

    If anything fails while writing, the temp dir is removed and the previous checkpoint stays intact.
    """
    from safetensors.torch import save_file

    tmp = out / f".{CKPT}.tmp-{os.getpid()}"
    final, old = out / CKPT, out / f".{CKPT}.old"
    try:
        tmp.mkdir(parents=True, exist_ok=False)
        save_file(model_sd, str(tmp / "model.safetensors"))
        extra = {"optimizer": opt_sd, "scheduler": sched.state_dict(), "torch_rng": torch.get_rng_state()}
        torch.save(extra, tmp / "opt.pt")
        (tmp / STATE_FILE).write_text(json.dumps({**state, "python_rng": random.getstate()}))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _load_checkpoint(ckpt: Path, value, opt, sched, *, fsdp: bool) -> dict:
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    o = _sd_options(fsdp)
    set_model_state_dict(value, load_file(str(ckpt / "model.safetensors")), options=o)
    extra = torch.load(ckpt / "opt.pt", map_location="cpu", weights_only=True)
    set_optimizer_state_dict(value, opt, extra["optimizer"], options=o)
    sched.load_state_dict(extra["scheduler"])
    torch.set_rng_state(extra["torch_rng"].cpu())
    state = json.loads((ckpt / STATE_FILE).read_text())
    v, internal, gauss = state["python_rng"]
    random.setstate((v, tuple(internal), gauss))
    return state


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


# ----------------------------------------------------------------------------- the loop
def train_value_model(cfg: TrainConfig) -> dict:
    """Train; returns a summary dict (also written to ``out/run.json``). See the module docstring."""
    cfg.validate()
    device = resolve_device(cfg.device)
    rank, world, dist = _dist_setup(device)
    out = Path(cfg.out)
    fp = cfg.fingerprint()
    if rank == 0:
        _check_out_dir(cfg, out, fp)
        out.mkdir(parents=True, exist_ok=True)
    if dist:
        dist.barrier()

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
    total_steps = stage_steps * len(cfg.bases)
    opt, sched = make_optimizer()

    step, stage = 0, 0
    resumed_from = None
    if cfg.resume:
        ckpt = _latest_checkpoint(out)
        if ckpt is not None:
            st = _load_checkpoint(ckpt, value, opt, sched, fsdp=fsdp)
            step, stage, resumed_from = st["step"], st["stage"], st["step"]
    if rank == 0 and not (out / "run.json").is_file():
        (out / "run.json").write_text(json.dumps({"config": fp, "data_hash": data.data_hash}, indent=1))

    log_path = out / "train_log.jsonl"
    if rank == 0 and resumed_from is not None and log_path.is_file():  # drop log lines past the checkpoint
        kept = [ln for ln in log_path.read_text().splitlines() if ln and json.loads(ln)["step"] <= resumed_from]
        log_path.write_text("".join(k + "\n" for k in kept))
    elif rank == 0 and resumed_from is None:
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
    while stage < len(cfg.bases):
        base = load_model(
            cfg.bases[stage], device=device, dtype=compute_dtype, engine="lean", allow_pickle=cfg.allow_pickle
        )
        base.requires_grad_(False).eval()
        stage_start = stage * stage_steps
        if step == stage_start and stage > 0:  # a new curriculum stage restarts the schedule
            opt, sched = make_optimizer()
        while step < stage_start + stage_steps:
            local = step - stage_start
            epoch, group = plans[stage].group(local)
            # token counts of the whole global batch (host-side, identical on every rank: no communication)
            counts = [sum(1 for i in b for x in data.examples[i].labels[1:] if x != IGNORE) for b in group]
            n_total = max(1, sum(counts))
            mine = list(range(rank, per_step, world))
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), device=device)
            for j, gi in enumerate(mine):
                batch = {k: v.to(device) for k, v in collate([data.examples[i] for i in group[gi]], pad_id).items()}
                sync_ctx = value_fwd.no_sync() if (dist and j < len(mine) - 1 and not cfg.fsdp) else _null()
                with sync_ctx, amp or _null():
                    loss, n_i = micro_batch_loss(cfg, value_fwd, value, base, batch)
                    weighted = loss * (n_i / n_total) * world  # DDP averages over ranks
                weighted.backward()
                loss_sum += loss.detach() * (n_i / n_total)
                tokens_seen += int(batch["attention_mask"].sum())
            if dist:
                dist.all_reduce(loss_sum)
            grad_norm = torch.nn.utils.clip_grad_norm_(value.parameters(), cfg.max_grad_norm or float("inf"))
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            loss_val = float(loss_sum)
            if not math.isfinite(loss_val):
                raise FloatingPointError(f"loss became {loss_val} at step {step}; stopping (last checkpoint kept)")
            dt = time.perf_counter() - t0
            rec = {
                "step": step,
                "stage": stage,
                "epoch": epoch,
                "loss": loss_val,
                "lr": sched.get_last_lr()[0],
                "grad_norm": float(grad_norm),
                "tokens": tokens_seen,
                "tokens_per_s": sum(len(data.examples[i].input_ids) for b in group for i in b) / max(dt, 1e-9),
            }
            if rank == 0:
                with log_path.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
                bar.set_postfix(loss=f"{loss_val:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}")
                bar.update(1)
            done_stage = step == stage_start + stage_steps
            if cfg.save_every and (step % cfg.save_every == 0 or done_stage):
                msd, osd = full_states(value, opt, fsdp=fsdp)  # every rank (collective under FSDP)
                if rank == 0:
                    st = {"step": step, "stage": stage + (1 if done_stage else 0), "epoch": epoch}
                    save_checkpoint(out, msd, osd, sched, st)
            if dist:
                dist.barrier()
            if cfg.debug_kill_at_step == step:
                import signal

                os.kill(os.getpid(), signal.SIGKILL)
        stage += 1
        del base
    bar.close()

    summary = {
        "steps": step,
        "world_size": world,
        "data": data.stats.as_dict(),
        "padding_fraction": padding_fraction(plans[0].batches(0), lengths),
        "seconds": time.perf_counter() - t_start,
        "resumed_from": resumed_from,
    }
    final_sd, _ = full_states(value, opt, fsdp=fsdp, with_optimizer=False)
    if rank == 0:
        _export(cfg, out, final_sd, tokenizer, data.data_hash, summary)
    if dist:
        dist.barrier()
    return summary


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _export(cfg: TrainConfig, out: Path, sd: dict, tokenizer, data_hash: str, summary: dict) -> None:
    """The final HF-format value network: config.json, model.safetensors, tokenizer, ivl.json, loss curve."""
    from safetensors.torch import save_file

    raw = read_config(cfg.value_init)
    raw["torch_dtype"] = "float32"
    raw.pop("dtype", None)
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(out)
    ivl = {
        "scheme": cfg.scheme,
        "l1": cfg.l1,
        "bases": [str(b) for b in cfg.bases],
        "value_init": str(cfg.value_init),
        "data": str(cfg.data),
        "data_hash": data_hash,
        "config_hash": hashlib.sha256(json.dumps(cfg.fingerprint(), sort_keys=True).encode()).hexdigest(),
        "train": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("debug_kill_at_step",)},
        "summary": summary,
    }
    (out / "ivl.json").write_text(json.dumps(ivl, indent=2, default=str))
    plot_loss(out / "train_log.jsonl", out / "loss_curve.png")


def plot_loss(log: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([r["step"] for r in recs], [r["loss"] for r in recs], lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (CE + L1)")
    ax.set_title("IVL value network training")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
