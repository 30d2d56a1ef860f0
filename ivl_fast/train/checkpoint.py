"""Saving a run: its checkpoint after an optimizer step, and at the end the summary and the exported network.

Both gather the value network's full state on every rank (a collective under FSDP) and write on rank 0 only;
the files themselves (atomic swap, layout of ``--out``) are :mod:`.run_dir`'s.
"""

from __future__ import annotations

from .data import padding_fraction
from .run_dir import export, full_states, save_checkpoint
from .setup import RunState, TrainRun


def checkpoint_due(run: TrainRun, state: RunState, done_stage: bool, stopping: bool) -> bool:
    """Every --save-every steps and at each stage's end (unless --save-every is 0), and always on Ctrl-C."""
    every = run.cfg.save_every
    return bool(every and (state.step % every == 0 or done_stage)) or stopping


def save_run_checkpoint(run: TrainRun, state: RunState, epoch: int, done_stage: bool) -> None:
    """out/checkpoint at ``state.step``: weights, optimizer, schedule, RNGs and the data position. A finished stage
    is saved as the start of the next one, so that a resume loads the next base."""
    msd, osd = full_states(run.value, state.opt, fsdp=run.fsdp)  # every rank (collective under FSDP)
    if run.dist.rank == 0:
        position = {"step": state.step, "stage": state.stage + (1 if done_stage else 0), "epoch": epoch}
        save_checkpoint(run.out, msd, osd, state.sched, position)


def finish(run: TrainRun, state: RunState, seconds: float) -> dict:
    """The run's summary (returned, and in out/ivl.json), after rank 0 exported the trained value network."""
    summary = {
        "steps": state.step,
        "steps_run": state.step - (state.resumed_from or 0),
        "world_size": run.dist.world,
        "data": run.data.stats.as_dict(),
        "padding_fraction": padding_fraction(run.plans[0].batches(0), run.plans[0].lengths),
        "seconds": seconds,
        "resumed_from": state.resumed_from,
    }
    final_sd, _ = full_states(run.value, state.opt, fsdp=run.fsdp, with_optimizer=False)
    if run.dist.rank == 0:
        export(run.cfg, run.out, final_sd, run.tokenizer, run.record, summary)
    run.dist.barrier()
    return summary
