"""The ops' backend choice: the triton kernels only with a triton at least as new as the tested floor."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import tomllib
import torch

from ivl_fast import build_info
from ivl_fast.ops import _backend
from ivl_fast.ops._backend import TRITON_MIN, pick_backend, triton_available, triton_version

ROOT = Path(__file__).resolve().parents[1]


def test_the_triton_floor_is_pyprojects():
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    (req,) = extra["triton"]
    m = re.fullmatch(r"triton>=(\d+)\.(\d+)", req)
    assert m and (int(m[1]), int(m[2])) == TRITON_MIN, req


def test_the_installed_triton_decides():
    # in the main suite a supported triton is installed; in the lowest-versions stage torch 2.5's triton 3.1 is not
    cuda = torch.device("cuda")  # a device object only: pick_backend reads its type
    if triton_available():
        assert triton_version() >= TRITON_MIN and pick_backend("auto", cuda) == "triton"
        assert build_info()["triton_kernels"] is True
    else:
        assert pick_backend("auto", cuda) == "torch"
        with pytest.raises(ValueError, match=r"needs triton >= 3\.5 \(found (no triton|triton \d+\.\d+)\)"):
            pick_backend("triton", cuda)
        assert build_info()["triton_kernels"] is False


@pytest.mark.parametrize("version, usable", [("3.1.0", False), ("3.4.0", False), ("3.5.0", True), ("3.10.1", True)])
def test_an_older_triton_counts_as_none(monkeypatch, version, usable):
    triton = pytest.importorskip("triton")
    monkeypatch.setattr(triton, "__version__", version)
    _backend.triton_version.cache_clear()
    try:
        cuda = torch.device("cuda")
        assert triton_available() is usable
        assert pick_backend("auto", cuda) == ("triton" if usable else "torch")
        if not usable:
            major_minor = ".".join(version.split(".")[:2])
            with pytest.raises(ValueError, match=rf"needs triton >= 3\.5 \(found triton {major_minor}\)"):
                pick_backend("triton", cuda)
        assert pick_backend("torch", cuda) == "torch"
    finally:
        _backend.triton_version.cache_clear()


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="backend must be one of"):
        pick_backend("cuda", torch.device("cpu"))
