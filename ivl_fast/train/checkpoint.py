"""Saving a run: its checkpoint after an optimizer step, and at the end the summary and the exported network.

Both gather the value network's full state on every rank (a collective under FSDP) and write on rank 0 only;
the files themselves (atomic swap, layout of ``--out``) are :mod:`.run_dir`'s.
"""

from __future__ import annotations

from .data import padding_fraction
from .run_dir import CKPT, drop_checkpoints, export, full_states, save_checkpoint
from .setup import RunState, TrainRun


def checkpoint_due(run: TrainRun, state: RunState, done_stage: bool, stopping: bool) -> bool:
    """Every --save-every steps and at each stage's end (unless --save-every is 0), and always on Ctrl-C."""
    every = run.cfg.save_every
    return bool(every and (state.step % every == 0 or done_stage)) or stopping


def save_run_checkpoint(run: TrainRun, state: RunState, done_stage: bool) -> None:
    """out/checkpoint at ``state.step``: weights, optimizer, schedule, RNGs and the data position. A finished stage
    is saved as the start of the next one, so that a resume loads the next base."""
    msd, osd = full_states(run.value, state.opt, fsdp=run.fsdp)  # every rank (collective under FSDP)
    if run.dist.rank == 0:
        position = {"step": state.step, "stage": state.stage + (1 if done_stage else 0), "epoch": state.epoch}
        save_checkpoint(run.out, msd, osd, state.sched, position, drop_latest=state.drop_latest)
    state.saved_step, state.drop_latest = state.step, False


def finish(run: TrainRun, state: RunState, seconds: float) -> dict:
    """The run's summary (returned, and in out/ivl.json), after rank 0 exported the trained value network.

    The export happens with a checkpoint of the final weights on disk: with --save-every 0 one is written for it
    and removed once the export is complete, so that a failed export (a full disk) loses nothing: ``--resume``
    finishes it."""
    if state.saved_step != state.step:  # --save-every 0: the loop saved none at the end
        save_run_checkpoint(run, state, done_stage=True)
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
        try:
            export(run.cfg, run.out, final_sd, run.tokenizer, run.record, summary)
        except Exception as e:
            raise OSError(
                f"exporting the value network into {str(run.out)!r} failed ({e}); the final weights are in its "
                f"{CKPT}/: run the same command with --resume to finish the export"
            ) from e
        if not run.cfg.save_every:  # kept only until the export was complete
            drop_checkpoints(run.out)
    run.dist.barrier()
    return summary
