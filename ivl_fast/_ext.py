"""The optional C++ extension ``ivl_fast._C`` (ops registered under ``torch.ops.ivl_fast``).

Everything has a pure-Python/torch path, so the package works when the extension was not built.
"""

from __future__ import annotations

import functools


@functools.cache
def extension_available() -> bool:
    try:
        import torch

        from . import _C  # noqa: F401  (loading the library registers the ops)

        return hasattr(torch.ops.ivl_fast, "align_counts")
    except (ImportError, OSError, AttributeError, RuntimeError):
        return False


def ops():
    import torch

    if not extension_available():
        raise RuntimeError("the ivl_fast._C extension is not built (pip install --no-build-isolation -e .)")
    return torch.ops.ivl_fast
