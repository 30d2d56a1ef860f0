"""The CPU wheel: builds with `pip wheel --no-build-isolation`, holds the package, the kernels and the built
extension, and imports from a fresh virtual environment (dependencies reached through a .pth file: no network)."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_cpu_wheel_builds_installs_and_imports(tmp_path):
    dist = tmp_path / "dist"
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", str(ROOT), "-w", str(dist)],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    whl = next(dist.glob("ivl_fast-*.whl"))
    names = zipfile.ZipFile(whl).namelist()
    assert "ivl_fast/decoder.py" in names
    # the kernels ship inside the package (the root folder kernels/, reached through the link ivl_fast/kernels)
    kernel_files = sorted(p.name for p in (ROOT / "kernels").glob("*.py"))
    assert "combine_and_sample.py" in kernel_files and "aot.py" in kernel_files
    assert all(f"ivl_fast/kernels/{f}" in names for f in kernel_files), [n for n in names if "kernels" in n]
    assert not any(n.startswith("kernels/") for n in names), "a top-level kernels/ in the wheel would shadow HF's"
    assert "ivl_fast/serve/static/chat.html" in names  # the chat page is package data
    # every subpackage of the source tree is in the wheel (a new one missing from setup.py would break imports)
    import ivl_fast

    root = Path(ivl_fast.__file__).parent
    for init in root.rglob("__init__.py"):
        rel = init.relative_to(root.parent).as_posix()
        assert rel in names, f"{rel} is missing from the wheel (list its package in setup.py)"
    assert any(n.startswith("ivl_fast/_C") and n.endswith(".so") for n in names), "extension missing from the wheel"

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    site = subprocess.check_output(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
    )
    site = site.strip()
    r = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "--target", site, str(whl)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    # dependencies (torch, transformers, ...) from this environment, appended after the fresh site-packages
    Path(site, "deps_from_test_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    code = (
        "import ivl_fast, torch; info = ivl_fast.build_info(); "
        f"assert ivl_fast.__file__.startswith({site!r}), ivl_fast.__file__; "
        "assert info['extension'] and info['extension_build'] == 'cpu', info; "
        "assert torch.ops.ivl_fast.edit_distance('kitten', 'sitting') == 3; "
        "import ivl_fast.kernels.aot, ivl_fast.ops, ivl_fast.train, ivl_fast.vocab; print('ok')"
    )
    r = subprocess.run([str(py), "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("IVL_CUDA_PYTHON"), reason="set IVL_CUDA_PYTHON to a Python with CUDA torch")
def test_cuda_wheel_builds_with_the_graph_runner(tmp_path):
    """Opt-in: with IVL_CUDA_PYTHON (a Python whose torch is a CUDA build, plus cmake >= 3.27, ninja, setuptools,
    wheel) and nvcc, the wheel holds an extension built for sm_80 + sm_90 that registers the graph runner.
    Needs no GPU (CMAKE_ARGS passes toolkit paths when they are not found by themselves)."""
    py = os.environ["IVL_CUDA_PYTHON"]
    dist = tmp_path / "dist"
    env = {**os.environ, "TORCH_CUDA_ARCH_LIST": "8.0;9.0", "PATH": f"{Path(py).parent}:{os.environ['PATH']}"}
    r = subprocess.run(
        [py, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", str(ROOT), "-w", str(dist)],
        capture_output=True,
        text=True,
        timeout=1800,
        env=env,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    whl = next(dist.glob("ivl_fast-*.whl"))
    so = next(n for n in zipfile.ZipFile(whl).namelist() if n.startswith("ivl_fast/_C") and n.endswith(".so"))
    target = tmp_path / "site"
    zipfile.ZipFile(whl).extractall(target)
    code = (
        "import torch; "
        f"torch.ops.load_library({str(target / so)!r}); "
        "print(torch.ops.ivl_fast.build_info()); "
        "print(torch.ops.ivl_fast.replay_graphs.default._schema)"
    )
    r = subprocess.run([py, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    build, schema = r.stdout.strip().splitlines()[-2:]
    assert build == "cuda:8.0,9.0"
    assert schema.startswith("ivl_fast::replay_graphs(int[] execs, int[] streams, int n_steps")
