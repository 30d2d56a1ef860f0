"""no_host_reads(): a block in which any host read of a tensor value fails (how "the step never syncs" is checked
on CPU), shared by tests/test_models.py and tests/test_decoder.py."""

from __future__ import annotations

import contextlib

import torch


class HostRead(AssertionError):
    """A tensor value was read on the host inside a block that must not do so."""


_HOST_READ_OPS = {  # aten ops whose result needs a device value on the host (.item(), bool(t), data-dependent shapes)
    getattr(torch.ops.aten, name).default
    for name in ("_local_scalar_dense", "item", "is_nonzero", "nonzero", "masked_select", "equal", "allclose")
    if hasattr(torch.ops.aten, name)
}
# Tensor methods that hand values to Python without an aten op (tolist) or copy to host memory
_HOST_READ_METHODS = ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__", "__array__")


@contextlib.contextmanager
def no_host_reads():
    """Inside the block any host read of a tensor value raises HostRead: on CPU there is no device to sync with,
    so this is how "the step never syncs" is checked here. Two nets: a dispatch mode sees every aten op (including
    the ones torch's C++ code runs for bool(t) or a boolean-mask index), and the Tensor methods that give Python
    numbers are replaced."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Trap(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in _HOST_READ_OPS:
                raise HostRead(f"{func} reads a tensor value on the host")
            if func in (torch.ops.aten.index.Tensor, torch.ops.aten.index_put_.default):
                if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ())):
                    raise HostRead(f"{func} with a boolean mask has a data-dependent shape")
            return func(*args, **kwargs)

    names = [name for name in _HOST_READ_METHODS if hasattr(torch.Tensor, name)]
    own = {name: torch.Tensor.__dict__[name] for name in names if name in torch.Tensor.__dict__}

    def trap(name):
        def method(self, *a, **k):
            raise HostRead(f"Tensor.{name} reads a tensor value on the host")

        return method

    for name in names:
        setattr(torch.Tensor, name, trap(name))
    try:
        with _Trap():
            yield
    finally:  # put back exactly what was there (methods inherited from the C base class stay inherited)
        for name in names:
            if name in own:
                setattr(torch.Tensor, name, own[name])
            else:
                delattr(torch.Tensor, name)
