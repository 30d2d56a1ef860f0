"""Triton kernels of ivl-fast, installed as ``ivl_fast.kernels``.

One op per file: ``_<op>_kernel`` (private) -> launcher, each with a plain-torch reference in ``ivl_fast.ops``
(see shared/DESIGN.md). Every kernel module lists ``AOT_SPECS`` (kernel, signature, constexprs, options) so
that :func:`compile_all` can build it ahead of time for sm_80 / sm_90 on a machine without a GPU.
"""

from __future__ import annotations

import importlib

KERNEL_MODULES = ("fused_ce_l1", "combine_and_sample")


def compile_all(capability: int) -> dict[str, int]:
    """Compile every kernel for ``capability`` (80, 90, ...) without a GPU; returns cubin sizes by kernel name.

    Must run without TRITON_INTERPRET=1 (the interpreter replaces the JIT functions).
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sizes = {}
    for mod_name in KERNEL_MODULES:
        mod = importlib.import_module(f"{__name__}.{mod_name}")
        for i, (fn, signature, constexprs, options) in enumerate(mod.AOT_SPECS):
            src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
            k = triton.compile(src, target=GPUTarget("cuda", capability, 32), options=options)
            sizes[f"{mod_name}.{fn.__name__}[{i}]"] = len(k.asm["cubin"])
    return sizes
