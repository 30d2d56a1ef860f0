"""Triton kernels of ivl-fast, installed as ``ivl_fast.kernels``.

One op per file: ``_<op>_kernel`` (private) -> launcher -> autograd.Function where needed, each with a
plain-torch reference beside it (see shared/DESIGN.md). The fused combine-and-sample kernel and the fused
CE+L1 loss arrive with their issues; the decoder uses the torch reference in ``ivl_fast.sampling`` until then.
"""
