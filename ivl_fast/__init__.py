"""ivl-fast: fast Inverse Value Learning (arXiv 2410.21027).

A small value network learns post-training as a logits delta on a small frozen base; at inference it steers
larger or different bases: ``z = z_base + alpha * z_value``.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .decoder import FastIVLDecoder, IVLGenerateOutput, NonFiniteLogitsError
from .models import load_model
from .sampling import SamplingParams, combine_logits, sample_ref, warp_logits


def build_info() -> dict:
    """What this installation has: package and torch versions, and whether the C++ extension was built."""
    import torch

    info = {
        "ivl_fast": __version__,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "extension": False,
        "extension_build": None,
    }
    from ._ext import extension_available, ops

    if extension_available():
        info["extension"] = True
        info["extension_build"] = ops().build_info()  # "cpu" or "cuda:<archs>"
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    from .ops._backend import triton_available

    info["triton_kernels"] = triton_available()  # False below the tested floor: the ops take their torch path
    return info


__all__ = [
    "FastIVLDecoder",
    "IVLGenerateOutput",
    "NonFiniteLogitsError",
    "SamplingParams",
    "build_info",
    "combine_logits",
    "load_model",
    "sample_ref",
    "warp_logits",
    "__version__",
]
