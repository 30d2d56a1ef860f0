"""Tensor-parallel serving: rank 0 runs the HTTP server and the scheduler; the other ranks follow its batch.

The scheduler changes the batch through three calls: ``admit_many(requests)`` (a prefill), ``step()`` (a decode
round) and ``retire(slot)``. On rank 0 :class:`MirroredBatch` broadcasts each call (its name and its host
arguments, the slot requests or a slot id) over a gloo group before making it; :func:`follow` on every other rank
makes the same call on its own batch, opened with the same settings. So every rank runs the same model calls, with
their collectives, in the same order, and holds the same rows. The batch's random stream is seeded alike on every
rank (:func:`shared_seed`), so sampled rows without a seed of their own draw the same tokens everywhere.

The control channel is its own gloo group: host objects, apart from the model's collectives (NCCL on GPUs).
NOTE: CUDA is not yet validated (no GPU lent); tested on CPU with gloo and 2 processes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..decode.stops import NonFiniteLogitsError

STOP = "stop"


def control_group():
    """A gloo group over every rank for the control messages (collective: every rank calls it)."""
    return dist.new_group(backend="gloo")


def shared_seed(group) -> int:
    """Rank 0 draws a seed, every rank seeds torch's global RNG with it (before the batch is opened: the batch draws
    its stream's seed from that RNG) -> the seed."""
    box = [int(torch.randint(0, 2**62, (1,))) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0, group=group)
    torch.manual_seed(box[0])
    return box[0]


class MirroredBatch:
    """Rank 0's batch: each call that changes it is broadcast to the other ranks first; everything else (its
    buffers, limits, checks) is the batch's own."""

    def __init__(self, batch, group):
        self._batch, self._group = batch, group

    def __getattr__(self, name):
        return getattr(self._batch, name)

    def _tell(self, op: str, arg=None) -> None:
        dist.broadcast_object_list([(op, arg)], src=0, group=self._group)

    def admit_many(self, requests: list) -> list[int]:
        self._tell("admit_many", requests)
        return self._batch.admit_many(requests)

    def step(self):
        self._tell("step")
        return self._batch.step()

    def retire(self, slot: int) -> None:
        self._tell("retire", slot)
        return self._batch.retire(slot)

    def close(self) -> None:
        """Let the other ranks' :func:`follow` return (after the scheduler has stopped)."""
        self._tell(STOP)


def follow(batch, group) -> int:
    """On a rank other than 0: make rank 0's calls on ``batch`` until it says stop -> the calls made. What rank 0's
    scheduler handles is handled here the same way (non-finite logits in a step: the same rows, the same logits;
    retiring a free slot). Any other error means this rank's batch no longer matches rank 0's: it is raised, the
    process ends, and torchrun ends the group, rather than rank 0 waiting in a collective forever."""
    import signal

    # a signal ends rank 0's server, which then says stop; this rank must not leave before it (torchrun passes
    # SIGTERM and a terminal's SIGINT to every rank)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    calls = 0
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0, group=group)
        op, arg = box[0]
        if op == STOP:
            return calls
        try:
            batch.step() if op == "step" else getattr(batch, op)(arg)
        except NonFiniteLogitsError:  # rank 0 has the same logits and fails the same rows; the batch goes on
            pass
        except ValueError:
            if op != "retire":  # rank 0's scheduler retires a free slot harmlessly; anything else is a divergence
                raise
        calls += 1
