"""Backend selection shared by the ops."""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "torch")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def pick_backend(backend: str, device: torch.device) -> str:
    """auto -> triton on CUDA (or on CPU under TRITON_INTERPRET=1), else torch."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    usable = triton_available() and (device.type == "cuda" or interp)
    if backend == "triton":
        if not usable:
            raise RuntimeError(
                f"backend='triton' needs triton and a CUDA tensor (or TRITON_INTERPRET=1 on CPU); got {device}"
            )
        return "triton"
    return "triton" if usable and device.type == "cuda" else "torch"
