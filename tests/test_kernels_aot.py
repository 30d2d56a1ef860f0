"""Every Triton kernel compiles ahead of time for sm_80 (A100) and sm_90 (H100/H800) without a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


@pytest.mark.parametrize("capability", [80, 90])
def test_kernels_compile_for(capability):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the interpreter replaces JIT fns
    code = f"import json; from ivl_fast.kernels.aot import compile_all; print(json.dumps(compile_all({capability})))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    sizes = json.loads(out.stdout.strip().splitlines()[-1])
    assert sizes and all(n > 1000 for n in sizes.values()), sizes
