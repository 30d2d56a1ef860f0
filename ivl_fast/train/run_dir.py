"""The files of a training run in ``--out``: what may be written or replaced there, checkpoints, the export.

Layout of ``--out`` (everything here is written by :mod:`ivl_fast.train`)::

    run.json            marker + the run's settings (resume must match them) + the exported files' names
    train_log.jsonl     one line per optimizer step
    checkpoint/         latest checkpoint: model.safetensors, opt.pt, trainer_state.json
    .checkpoint.old/    the previous one, only during a swap (survives a crash in the middle of it)
    config.json, model.safetensors, tokenizer files, ivl.json, loss_curve.png   the exported value network

``--overwrite`` deletes exactly these entries, and only in a directory whose run.json says this trainer wrote
it; any other entry refuses the run before anything is deleted (:mod:`ivl_fast.safe_output`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from ..models.checkpoint import read_config
from ..safe_output import UnsafeOutputError, check_output_location, check_owned_dir, clear_owned_dir
from .config import TrainConfig

CKPT = "checkpoint"
STATE_FILE = "trainer_state.json"
RUN_FILE = "run.json"
LOG_FILE = "train_log.jsonl"
WRITTEN_BY = "ivl-fast train"
# what a run always may write into --out; the tokenizer files it exported are listed in run.json["outputs"]
RUN_ENTRIES = (
    *(RUN_FILE, LOG_FILE, CKPT, f".{CKPT}.old"),
    *("config.json", "model.safetensors", "ivl.json", "loss_curve.png"),
)
RUN_PREFIXES = (f".{CKPT}.tmp-",)
# settings a resumed run may change: they only make the run longer or shorter
EXTENDABLE = ("epochs", "max_steps")


def read_run_file(out: Path) -> dict | None:
    """run.json of an ivl-fast training run in ``out``, or None if there is none (or it is not one)."""
    try:
        run = json.loads((out / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None
    return run if isinstance(run, dict) and isinstance(run.get("config"), dict) else None


def write_run_file(out: Path, run: dict) -> None:
    (out / RUN_FILE).write_text(json.dumps({"written_by": WRITTEN_BY, **run}, indent=1))


def _owned_by_run(run: dict) -> Callable[[str], bool]:
    names = set(RUN_ENTRIES) | set(run.get("outputs", []))
    return lambda name: name in names or name.startswith(RUN_PREFIXES)


def check_out_dir(cfg: TrainConfig, out: Path, fp: dict) -> dict | None:
    """Decide what --out may become before anything is written; returns the run.json of a run to resume.

    Never an input, a parent of one or the working directory. --overwrite replaces only a directory this
    trainer wrote (its run.json says so), and only the entries it wrote; anything else refuses the run.
    """
    check_output_location(out, {"--base": cfg.bases, "--value-init": cfg.value_init, "--data": cfg.data})
    if out.exists() and not out.is_dir():
        raise UnsafeOutputError(f"--out {str(out)!r} is a file, not a directory")
    if not out.exists() or not any(out.iterdir()):
        if cfg.resume:
            raise FileNotFoundError(f"--resume: {str(out)!r} holds no run to resume")
        return None
    run = read_run_file(out)
    if cfg.overwrite:  # only checked here: replace_earlier_run deletes, once every input has been checked
        _owned_run(out, run)
        return None
    if not cfg.resume:
        raise FileExistsError(
            f"--out {str(out)!r} already holds files (a previous run?); pass --resume to continue it or "
            "--overwrite to replace it"
        )
    if run is None:
        raise FileExistsError(f"--resume: {str(out)!r} holds files but no {RUN_FILE}: not an ivl-fast training run")
    old = run["config"]
    diff = {k: (old.get(k), v) for k, v in fp.items() if old.get(k) != v and k not in EXTENDABLE}
    if diff:
        raise ValueError(f"--resume: {str(out)!r} holds a different run; settings differ: {diff}")
    return run


def _owned_run(out: Path, run: dict | None) -> Callable[[str], bool]:
    if run is None or run.get("written_by") != WRITTEN_BY:
        raise UnsafeOutputError(
            f"--overwrite: {str(out)!r} is not a directory ivl-fast training wrote (it has no {RUN_FILE} of "
            "ivl-fast's); nothing was deleted: choose another --out"
        )
    owned = _owned_by_run(run)
    check_owned_dir(out, owned, flag="--out", owner="ivl-fast training")
    return owned


def replace_earlier_run(out: Path) -> None:
    """--overwrite: delete the earlier run's entries (checked again: only what a run wrote, else nothing)."""
    if out.is_dir() and any(out.iterdir()):
        clear_owned_dir(out, _owned_run(out, read_run_file(out)), flag="--out", owner="ivl-fast training")


def undo_fresh_run(out: Path, created_dir: bool) -> None:
    """A new run failed before its first checkpoint: remove what it wrote, so the corrected rerun is not refused."""
    if latest_checkpoint(out) is not None:
        return
    for name in (RUN_FILE, LOG_FILE):
        (out / name).unlink(missing_ok=True)
    if created_dir and out.is_dir() and not any(out.iterdir()):
        out.rmdir()


def latest_checkpoint(out: Path) -> Path | None:
    for name in (CKPT, f".{CKPT}.old"):  # .old survives a crash in the middle of a swap
        p = out / name
        if (p / STATE_FILE).is_file():
            return p
    return None


def checkpoint_step(ckpt: Path) -> int:
    return int(json.loads((ckpt / STATE_FILE).read_text())["step"])


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

    If anything fails while writing, the temp dir is removed and the previous checkpoint stays intact. Only a
    checkpoint this trainer wrote (it holds trainer_state.json) is ever rotated out and deleted.
    """
    from safetensors.torch import save_file

    tmp = out / f".{CKPT}.tmp-{os.getpid()}"
    final, old = out / CKPT, out / f".{CKPT}.old"
    for p in (final, old):
        if p.exists() and not (p / STATE_FILE).is_file():
            raise UnsafeOutputError(f"{str(p)!r} is not a checkpoint ivl-fast wrote; refusing to replace it")
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


def load_checkpoint(ckpt: Path, value, opt, sched, *, fsdp: bool) -> dict:
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


def export(cfg: TrainConfig, out: Path, sd: dict, tokenizer, run: dict, summary: dict) -> None:
    """The final HF-format value network: config.json, model.safetensors, tokenizer, ivl.json, loss curve.

    The tokenizer's file names are recorded in run.json, so --overwrite knows them as the run's own.
    """
    from safetensors.torch import save_file

    if cfg.scheme == "probe":  # not a transformers model: its own config (ivl_fast.models.probe)
        from ..models.probe import probe_config

        (i, h), v = sd["gate_proj.weight"].shape, sd["lm_head.weight"].shape[0]
        raw = probe_config(int(h), int(i), int(v))
    else:
        raw = read_config(cfg.value_init)
    raw["torch_dtype"] = "float32"
    raw.pop("dtype", None)
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    written = tokenizer.save_pretrained(out)
    run = {**run, "outputs": sorted({Path(f).name for f in written} - set(RUN_ENTRIES))}
    write_run_file(out, run)
    ivl = {
        "scheme": cfg.scheme,
        "l1": cfg.l1,
        "bases": [str(b) for b in cfg.bases],
        "value_init": str(cfg.value_init),
        "data": str(cfg.data),
        "data_hash": run["data_hash"],
        "config_hash": hashlib.sha256(json.dumps(cfg.fingerprint(), sort_keys=True).encode()).hexdigest(),
        "train": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("debug_kill_at_step",)},
        "summary": summary,
    }
    (out / "ivl.json").write_text(json.dumps(ivl, indent=2, default=str))
    plot_loss(out / LOG_FILE, out / "loss_curve.png")


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
