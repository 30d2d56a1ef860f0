"""The files of a training run in ``--out``: what may be written or replaced there, checkpoints, the export.

Layout of ``--out`` (everything here is written by :mod:`ivl_fast.train`)::

    run.json            marker + the run's settings (resume must match them) + the exported files' names
    train_log.jsonl     one line per optimizer step
    checkpoint/         latest checkpoint: model.safetensors, opt.pt, trainer_state.json (with the SHA-256 of
                        the other two: a resume checks them)
    .checkpoint.old/    the previous checkpoint, kept: a resume falls back on it when the latest is damaged
    .checkpoint.tmp-PID/, .NAME.tmp-PID   a checkpoint or an exported file being written (a killed run's are
                        removed by the next run on this --out)
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
from ..safe_output import (
    UnsafeOutputError,
    check_output_location,
    check_owned_dir,
    clear_owned_dir,
    replace_file_atomically,
)
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
CKPT_FILES = ("model.safetensors", "opt.pt")  # beside STATE_FILE, which holds their checksums
TMP_TAG = ".tmp-"  # + the writing process's id: a checkpoint dir or exported file not yet complete
# the exported files written through a temp file beside them (safe_output.replace_file_atomically: .NAME.tmp-PID)
EXPORTED_ATOMICALLY = ("config.json", "model.safetensors", "ivl.json")
RUN_PREFIXES = (f".{CKPT}{TMP_TAG}", *(f".{name}{TMP_TAG}" for name in EXPORTED_ATOMICALLY))
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


class DamagedCheckpoint(ValueError):
    """A checkpoint whose files are missing, unreadable or do not match their checksums (nothing was changed)."""


def latest_checkpoint(out: Path) -> Path | None:
    """The newest checkpoint directory present (not checked: :func:`choose_checkpoint` checks)."""
    for name in (CKPT, f".{CKPT}.old"):  # .old survives a crash in the middle of a swap
        p = out / name
        if p.is_dir():
            return p
    return None


def checkpoint_step(ckpt: Path) -> int:
    return int(json.loads((ckpt / STATE_FILE).read_text())["step"])


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_checkpoint(ckpt: Path) -> dict:
    """``ckpt``'s trainer_state.json after checking every file it lists against its SHA-256; DamagedCheckpoint
    naming the file and what is wrong. A checkpoint written before checksums existed is checked for its files only
    (its state says ``"verified": False``)."""
    state_path = ckpt / STATE_FILE
    try:
        state = json.loads(state_path.read_text())
    except FileNotFoundError:
        raise DamagedCheckpoint(f"{state_path} is missing") from None
    except (OSError, ValueError) as e:
        raise DamagedCheckpoint(f"{state_path} is not readable JSON ({e})") from None
    if not isinstance(state, dict) or not all(isinstance(state.get(k), int) for k in ("step", "stage", "epoch")):
        raise DamagedCheckpoint(f"{state_path} lacks the run's position (step, stage, epoch)")
    digest = state.pop("state_sha256", None)
    if digest is not None and digest != _state_digest(state):  # a flipped digit would still parse
        raise DamagedCheckpoint(f"{state_path} does not match its own SHA-256 (corrupted or changed)")
    files = state.get("files")
    if files is None:  # written by an earlier ivl-fast
        missing = [n for n in CKPT_FILES if not (ckpt / n).is_file()]
        if missing:
            raise DamagedCheckpoint(f"{ckpt / missing[0]} is missing")
        return {**state, "verified": False}
    if not isinstance(files, dict) or sorted(files) != sorted(CKPT_FILES):
        raise DamagedCheckpoint(f"{state_path} does not list the checkpoint's files ({', '.join(CKPT_FILES)})")
    for name, digest in files.items():
        p = ckpt / name
        if not p.is_file():
            raise DamagedCheckpoint(f"{p} is missing")
        if sha256_file(p) != digest:
            raise DamagedCheckpoint(f"{p} does not match its SHA-256 in {STATE_FILE} (corrupted or changed)")
    return {**state, "verified": True}


def _state_digest(state: dict) -> str:
    """SHA-256 of a checkpoint's state (without this digest), as canonical JSON."""
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()


def choose_checkpoint(out: Path) -> tuple[Path, dict, list[str]]:
    """The checkpoint a resume loads: the latest, or the previous one when the latest is damaged -> (its path, its
    state, what was skipped and why). DamagedCheckpoint when none is usable, FileNotFoundError when there is none;
    nothing is changed either way."""
    found, skipped = [], []
    for name in (CKPT, f".{CKPT}.old"):
        p = out / name
        if not p.exists():
            continue
        found.append(p)
        try:
            return p, verify_checkpoint(p), skipped
        except DamagedCheckpoint as e:
            skipped.append(str(e))
    if not found:
        raise FileNotFoundError(
            f"--resume: {str(out)!r} holds no checkpoint (the run stopped before its first one, or it kept none: "
            "--save-every 0); nothing was changed: start it again with --overwrite"
        )
    why = "; ".join(skipped)
    raise DamagedCheckpoint(f"--resume: no usable checkpoint in {str(out)!r}: {why}; nothing was changed")


def remove_stale_temps(out: Path) -> list[str]:
    """Remove what a killed run left half-written in ``out`` (a ``.checkpoint.tmp-PID`` dir, an exported file's
    ``.NAME.tmp-PID``) when no live process has that id; -> the names removed."""
    removed = []
    for p in out.iterdir() if out.is_dir() else ():
        if not p.name.startswith(RUN_PREFIXES):
            continue
        pid = p.name.rsplit(TMP_TAG, 1)[1]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue  # another run is writing there right now
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        removed.append(p.name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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


def save_checkpoint(out: Path, model_sd: dict, opt_sd: dict, sched, state: dict, *, drop_latest: bool = False) -> Path:
    """Write weights + optimizer + scheduler + RNG + data position into a temp dir, with the SHA-256 of each file
    (read back from disk) in trainer_state.json, then swap it in: the latest becomes ``.checkpoint.old`` (kept, a
    resume's fallback) and the new one ``checkpoint``. ``drop_latest``: the latest is damaged (the run resumed
    from the previous one), so it is removed instead of kept.

    If anything fails while writing (a full disk), the temp dir is removed, the checkpoints on disk stay as they
    were, and an OSError says so. Only a checkpoint directory holding nothing but a checkpoint's files is ever
    rotated out or deleted.
    """
    from safetensors.torch import save_file

    tmp = out / f".{CKPT}{TMP_TAG}{os.getpid()}"
    final, old = out / CKPT, out / f".{CKPT}.old"
    for p in (final, old):
        if p.exists() and not (p.is_dir() and set(os.listdir(p)) <= {STATE_FILE, *CKPT_FILES}):
            raise UnsafeOutputError(f"{str(p)!r} is not a checkpoint ivl-fast wrote; refusing to replace it")
    try:
        tmp.mkdir(parents=True, exist_ok=False)
        save_file(model_sd, str(tmp / "model.safetensors"))
        extra = {"optimizer": opt_sd, "scheduler": sched.state_dict(), "torch_rng": torch.get_rng_state()}
        torch.save(extra, tmp / "opt.pt")
        files = {name: sha256_file(tmp / name) for name in CKPT_FILES}  # what is on disk, not what was meant
        full = {**state, "python_rng": random.getstate(), "files": files}
        (tmp / STATE_FILE).write_text(json.dumps({**full, "state_sha256": _state_digest(full)}))
        _fsync_dir(tmp)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception) and not isinstance(e, UnsafeOutputError):  # torch and safetensors raise their
            raise OSError(f"writing a checkpoint into {str(out)!r} failed ({e}); the earlier ones are kept") from e
        raise
    if final.exists():
        if drop_latest:
            shutil.rmtree(final)
        else:
            if old.exists():
                shutil.rmtree(old)
            final.rename(old)
    tmp.rename(final)
    _fsync_dir(out)
    return final


def drop_checkpoints(out: Path) -> None:
    """Remove the checkpoints of a --save-every 0 run once its export is complete (it asked for none to be kept)."""
    for name in (CKPT, f".{CKPT}.old"):
        p = out / name
        if p.is_dir() and set(os.listdir(p)) <= {STATE_FILE, *CKPT_FILES}:
            shutil.rmtree(p)


def _fsync_dir(d: Path) -> None:
    """Make the files in ``d`` and its entries durable (a power cut after the swap keeps the new checkpoint)."""
    for p in d.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(ckpt: Path, state: dict, value, opt, sched, *, fsdp: bool) -> dict:
    """Load a checkpoint :func:`verify_checkpoint` passed (``state``: what it returned) into the run; a file that
    still cannot be read (a checkpoint without checksums, or one crafted to match them) is a DamagedCheckpoint
    naming it. opt.pt is read with ``weights_only=True``: it can hold tensors and plain values, never code."""
    import pickle

    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    o = _sd_options(fsdp)
    weights, extra = ckpt / "model.safetensors", ckpt / "opt.pt"
    try:
        model_sd = load_file(str(weights))
    except Exception as e:  # noqa: BLE001  (safetensors' own error types)
        raise DamagedCheckpoint(f"{weights} cannot be read as safetensors ({e})") from None
    try:
        extra_sd = torch.load(extra, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        why = str(e).strip().splitlines()[0]
        raise DamagedCheckpoint(f"{extra} cannot be loaded as tensors and plain values ({why})") from None
    try:
        set_model_state_dict(value, model_sd, options=o)
        set_optimizer_state_dict(value, opt, extra_sd["optimizer"], options=o)
        sched.load_state_dict(extra_sd["scheduler"])
        torch.set_rng_state(extra_sd["torch_rng"].cpu())
        v, internal, gauss = state["python_rng"]
        random.setstate((v, tuple(internal), gauss))
    except (KeyError, RuntimeError, TypeError, ValueError) as e:
        raise DamagedCheckpoint(f"{ckpt} does not fit this run's value network and optimizer ({e})") from None
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
    # each file through a temp file and a rename: a failure (a full disk) never leaves half a model.safetensors
    replace_file_atomically(out / "config.json", lambda p: p.write_text(json.dumps(raw, indent=2)))
    replace_file_atomically(out / "model.safetensors", lambda p: save_file(sd, str(p), metadata={"format": "pt"}))
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
    replace_file_atomically(out / "ivl.json", lambda p: p.write_text(json.dumps(ivl, indent=2, default=str)))
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
