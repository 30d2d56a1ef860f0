"""`--tp N`: the process group of a tensor-parallel run, started by torchrun (one process per rank)."""

from __future__ import annotations

import contextlib
import os

from .errors import UsageError


def init_tensor_parallel(tp: int | None) -> int:
    """Join the process group torchrun set up (NCCL on CUDA, gloo on CPU) for ``--tp N``; -> this process's rank
    (0 without --tp). UsageError when the processes do not match N."""
    if tp is None or tp == 1:
        return 0
    if tp < 1:
        raise UsageError(f"--tp must be >= 1, got {tp}")
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
            raise UsageError(
                f"--tp {tp} needs {tp} processes: run it as torchrun --nproc_per_node {tp} -m ivl_fast.cli ..."
            )
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    world = dist.get_world_size()
    if world != tp:
        raise UsageError(f"--tp {tp} but torchrun started {world} processes (--nproc_per_node {tp})")
    return dist.get_rank()


@contextlib.contextmanager
def quiet_unless(rank_zero: bool):
    """Rank 0 prints; the others' stdout and stderr go nowhere inside the block (an exception still reaches the
    real stderr once it leaves the block)."""
    if rank_zero:
        yield
        return
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
        yield
