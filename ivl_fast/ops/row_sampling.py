"""RowSampling: what combine_and_sample needs to draw one token per row, as one object (vLLM's SamplingMetadata).

Built once and trusted inside: :meth:`RowSampling.checked` validates a caller's arguments (combine_and_sample's
public keywords), and the decode buffers build theirs once per step configuration from their own per-row tensors
(``DecodeBuffers.sampling_view``), which later steps update in place. It travels whole from the decode step to the
op, which hands it to the torch reference or turns it into the kernel's inputs by name (:meth:`kernel_inputs`).

What no row uses is static: ``params.greedy`` (no draw at all), ``params.top_k_on`` / ``top_p_on`` / ``min_p_on``,
``params.penalties_on`` and whether row seeds are given; the kernel compiles those paths out (an input left None
switches its path off) and the reference skips them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..sampling import SamplingParams


def _as_row_tensor(name: str, v, b: int, dtype, device) -> torch.Tensor:
    """Scalar or [B] -> contiguous [B] tensor on device; scalars go through torch.full (no blocking copy)."""
    if not isinstance(v, torch.Tensor):
        return torch.full((b,), v, dtype=dtype, device=device)
    if v.dim() == 0:
        return v.to(device=device, dtype=dtype).expand(b).contiguous()
    if v.shape != (b,):
        raise ValueError(f"{name} must be a scalar or a [B={b}] tensor, got shape {tuple(v.shape)}")
    return v.to(device=device, dtype=dtype).contiguous()


def _check_penalty_inputs(prompt_mask, output_counts, b: int, v_out: int, device, on: bool) -> None:
    """prompt_mask [B, V_out] bool and output_counts [B, V_out] int32: required when a penalty is on, and checked
    (device, dtype, shape: metadata only, no sync) whenever given."""
    for name, t, dtype in (("prompt_mask", prompt_mask, torch.bool), ("output_counts", output_counts, torch.int32)):
        if t is None:
            if on:
                raise ValueError(
                    f"{name} ([B={b}, V={v_out}] {dtype}) is required when repetition_penalty, presence_penalty or "
                    f"frequency_penalty is on, got None"
                )
            continue
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a [B={b}, V={v_out}] {dtype} tensor, got {type(t).__name__}")
        if tuple(t.shape) != (b, v_out):
            raise ValueError(f"{name} must be [B={b}, V={v_out}] (the output vocabulary), got shape {tuple(t.shape)}")
        if t.dtype != dtype:
            raise ValueError(f"{name} must be {dtype}, got {t.dtype}")
        if t.device != device:
            raise ValueError(f"{name} must be on {device} (the logits' device), got {t.device}")


def _check_row_seeds(row_seed, row_step, seeded, b: int, device) -> None:
    """All three [B] tensors (int64, int64, bool) on ``device``, or none (metadata only)."""
    given = [t is not None for t in (row_seed, row_step, seeded)]
    if not any(given):
        return
    if not all(given):
        raise ValueError("row_seed, row_step and seeded go together: pass all three [B] tensors or none")
    for name, t, dtype in (("row_seed", row_seed, torch.int64), ("row_step", row_step, torch.int64)) + (
        ("seeded", seeded, torch.bool),
    ):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (b,) or t.dtype != dtype or t.device != device:
            got = f"{tuple(t.shape)} {t.dtype} on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a [B={b}] {dtype} tensor on {device}, got {got}")


@dataclass(frozen=True)
class RowSampling:
    """The sampling of one batch: ``params`` (warpers and penalties: scalars, or [B] tensors read per row), the
    random streams and the penalties' state. Every field is trusted (see :meth:`checked`)."""

    params: SamplingParams
    seed: torch.Tensor | int | None = None  # the kernel's batch stream: its Philox key ([1] int64 or an int)
    offset: torch.Tensor | int = 0  # and counter: a [1] int64 tensor the caller advances on device (graph replays)
    generator: torch.Generator | None = None  # the torch path's stream
    prompt_mask: torch.Tensor | None = None  # [B, V_out] bool: the token occurs in the row's prompt
    output_counts: torch.Tensor | None = None  # [B, V_out] int32: how often the row generated it so far
    # rows with their own stream (all three or none): Philox(row_seed; column, 0, row_step) where seeded
    row_seed: torch.Tensor | None = None  # [B] int64
    row_step: torch.Tensor | None = None  # [B] int64
    seeded: torch.Tensor | None = None  # [B] bool

    @classmethod
    def checked(
        cls,
        b: int,
        v_out: int,
        device: torch.device,
        *,
        do_sample=False,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        min_p=0.0,
        repetition_penalty=1.0,
        presence_penalty=0.0,
        frequency_penalty=0.0,
        seed=None,
        offset=0,
        generator=None,
        prompt_mask=None,
        output_counts=None,
        row_seed=None,
        row_step=None,
        seeded=None,
    ) -> RowSampling:
        """A caller's arguments for a batch of ``b`` rows over ``v_out`` tokens on ``device``, validated: a
        ValueError names the argument (values of [B] tensors are read back: a sync, once)."""
        pen = dict(
            repetition_penalty=repetition_penalty,
            presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty,
        )
        params = SamplingParams(bool(do_sample), temperature, top_k, top_p, min_p, **pen)
        for name, val in pen.items():
            if isinstance(val, torch.Tensor) and val.dim() > 0 and tuple(val.shape) != (b,):
                raise ValueError(f"{name} must be a scalar or a [B={b}] tensor, got shape {tuple(val.shape)}")
        _check_penalty_inputs(prompt_mask, output_counts, b, v_out, device, params.penalties_on)
        _check_row_seeds(row_seed, row_step, seeded, b, device)
        return cls(params, seed, offset, generator, prompt_mask, output_counts, row_seed, row_step, seeded)

    @property
    def row_seeds(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(row_seed, row_step, seeded) [B] each, or None."""
        return None if self.row_seed is None else (self.row_seed, self.row_step, self.seeded)

    def penalty_state(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(prompt_mask, output_counts) when a penalty is on (both then required: checked here, metadata only)."""
        if not self.params.penalties_on:
            return None
        if self.prompt_mask is None or self.output_counts is None:
            raise ValueError(
                "prompt_mask and output_counts are required when repetition_penalty, presence_penalty or "
                "frequency_penalty is on"
            )
        return self.prompt_mask, self.output_counts

    def kernel_inputs(self, b: int, device: torch.device) -> dict:
        """The fused kernel's sampling inputs by name (``kernels/combine_and_sample.py``, INPUTS): [B] tensors of
        the per-row values, None for every path no row uses (a greedy batch draws nothing)."""
        p = self.params
        f32, i64 = torch.float32, torch.int64
        x: dict = {}
        if not p.greedy:
            x["temperature"] = _as_row_tensor("temperature", p.temperature, b, f32, device)
            x["top_k"] = _as_row_tensor("top_k", p.top_k, b, i64, device) if p.top_k_on else None
            x["top_p"] = _as_row_tensor("top_p", p.top_p, b, f32, device) if p.top_p_on else None
            x["min_p"] = _as_row_tensor("min_p", p.min_p, b, f32, device) if p.min_p_on else None
            x["seed"] = _as_row_tensor("seed", 0 if self.seed is None else self.seed, 1, i64, device)
            x["offset"] = _as_row_tensor("offset", self.offset, 1, i64, device)
            if self.row_seed is not None:
                x.update(row_seed=self.row_seed, row_step=self.row_step, seeded=self.seeded)
        state = self.penalty_state()
        if state is not None:
            x.update(prompt_mask=state[0], output_counts=state[1])
            for name, val in (
                ("repetition_penalty", p.repetition_penalty),
                ("presence_penalty", p.presence_penalty),
                ("frequency_penalty", p.frequency_penalty),
            ):
                x[name] = _as_row_tensor(name, val, b, f32, device)
        return x
