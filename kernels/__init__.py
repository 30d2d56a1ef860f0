"""Triton kernels of ivl-fast, installed as ``ivl_fast.kernels``.

One op per file, named after its public op in ``ivl_fast.ops``: ``fused_ce_l1.py`` (the private
``_ce_l1_kernel`` and its launcher ``ce_l1_rows``) and ``combine_and_sample.py`` (``_combine_sample_kernel`` and
``launch``). The package reaches a kernel only through its op (``ivl_fast.ops.fused_ce_l1``,
``ivl_fast.ops.combine_and_sample``), which picks the Triton or the torch path; the op's plain-torch reference
(``fused_ce_l1_ref``, ``combine_and_sample_ref``) defines what both compute (README.md, "Layout" and "Testing").
Every kernel module lists ``AOT_SPECS`` (kernel, signature, constexprs, options) so that :func:`compile_all`
can build it ahead of time on a machine without a GPU (tests/test_kernels_aot.py: sm_80 and sm_90).
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
