"""Ahead-of-time compilation of every Triton kernel of ivl-fast, on a machine without a GPU.

One op per file in this folder, named after its public op in ``ivl_fast.ops``: ``fused_ce_l1.py`` (the private
``_ce_l1_kernel`` and its launcher ``ce_l1_rows``) and ``combine_and_sample.py`` (``_combine_sample_kernel`` and
``launch``). The package reaches a kernel only through its op (``ivl_fast.ops.fused_ce_l1``,
``ivl_fast.ops.combine_and_sample``), which picks the Triton or the torch path; the op's plain-torch reference
(``fused_ce_l1_ref``, ``combine_and_sample_ref``) defines what both compute (docs/layout.md, "Layout", and
docs/benchmarks.md, "Testing").
Every kernel module lists ``AOT_SPECS`` (kernel, signature, constexprs, options) so that :func:`compile_all`
can build it ahead of time (tests/test_kernels_aot.py: sm_80 and sm_90).

The folder is the namespace package ``ivl_fast.kernels`` (the package's kernels folder is a link to it) and has no
`__init__.py` on purpose: a regular package named `kernels` at the repository root would shadow Hugging Face's
`kernels`, which transformers imports with every model class, in any Python started in the root (docs/layout.md,
"Layout"; tests/test_import_names.py).
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
        mod = importlib.import_module(f"{__package__}.{mod_name}")
        for i, (fn, signature, constexprs, options) in enumerate(mod.AOT_SPECS):
            src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
            k = triton.compile(src, target=GPUTarget("cuda", capability, 32), options=options)
            sizes[f"{mod_name}.{fn.__name__}[{i}]"] = len(k.asm["cubin"])
    return sizes
