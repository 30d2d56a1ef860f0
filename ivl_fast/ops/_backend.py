"""Backend selection shared by the ops."""

from __future__ import annotations

import functools
import os
import re

import torch

BACKENDS = ("auto", "triton", "torch")
# The lowest triton the kernels are tested with (.ci/lowest-versions runs them at pyproject's `[triton]` floor, which
# tests/test_backend.py ties to this). NOTE: older releases fail here: 3.4's interpreter returned an id out of the
# vocabulary for an inf logit instead of flagging it, 3.1-3.3's interpreter lacks ops the kernels use.
TRITON_MIN = (3, 5)


@functools.cache
def triton_version() -> tuple[int, int] | None:
    """(major, minor) of the importable triton, or None when there is none."""
    try:
        import triton
    except ImportError:
        return None
    m = re.match(r"(\d+)\.(\d+)", triton.__version__)
    return (int(m[1]), int(m[2])) if m else None


def triton_available() -> bool:
    """True when a triton the kernels support is importable (``TRITON_MIN`` or newer)."""
    version = triton_version()
    return version is not None and version >= TRITON_MIN


def pick_backend(backend: str, device: torch.device) -> str:
    """auto -> triton on CUDA (or on CPU under TRITON_INTERPRET=1), else torch. An older triton than ``TRITON_MIN``
    (torch 2.5-2.8 pin 3.1-3.4) counts as none: auto takes the torch path, backend='triton' is refused."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    usable = triton_available() and (device.type == "cuda" or interp)
    if backend == "triton":
        if not usable:
            found = triton_version()
            need = ".".join(map(str, TRITON_MIN))
            have = "no triton" if found is None else "triton " + ".".join(map(str, found))
            raise ValueError(  # a bad option (--sample-backend triton on a CPU): one line from the CLI
                f"backend='triton' needs triton >= {need} (found {have}) and a CUDA tensor (or TRITON_INTERPRET=1 on "
                f"CPU); got {device}"
            )
        return "triton"
    return "triton" if usable and device.type == "cuda" else "torch"
