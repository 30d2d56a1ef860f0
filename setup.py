"""Build driver for ivl-fast.

The package is Python plus Triton kernels (``kernels/`` installs as ``ivl_fast.kernels``) plus the C++
extension ``ivl_fast._C``, described by CMakeLists.txt and built here by CMake from ``csrc/``: the vocabulary-map
DTW alignment (CPU), and with a CUDA build of torch the CUDA-graph replay runner (not yet validated on GPU).
Every op has a Python fallback, so the package also works without it. Environment: MAX_JOBS, NVCC_THREADS,
TORCH_CUDA_ARCH_LIST (default "8.0;9.0"), CMAKE_ARGS (extra CMake options).
"""

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configure and build CMakeLists.txt with torch's CMake package; honours MAX_JOBS and CMAKE_ARGS."""

    def build_extension(self, ext: Extension) -> None:
        import torch  # (build with --no-build-isolation so the installed torch is used)
        from torch.utils import cmake_prefix_path

        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()  # .../ivl_fast
        # one CMake cache per torch build: a cache made against another torch (CPU vs CUDA) would be reused
        build_dir = Path(self.build_temp).resolve() / f"{ext.name}-torch{torch.__version__}"
        build_dir.mkdir(parents=True, exist_ok=True)
        cfg = "Debug" if self.debug else "Release"
        args = [
            f"-DCMAKE_PREFIX_PATH={cmake_prefix_path}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
        ]
        if os.environ.get("TORCH_CUDA_ARCH_LIST"):
            args.append(f"-DTORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
        if os.environ.get("NVCC_THREADS"):
            args.append(f"-DNVCC_THREADS={os.environ['NVCC_THREADS']}")
        # torch's CMake package still calls find_package(CUDA), which CMake >= 3.27 hides behind policy CMP0146
        args.append("-DCMAKE_POLICY_DEFAULT_CMP0146=OLD")
        args += shlex.split(os.environ.get("CMAKE_ARGS", ""))  # extra -D options (e.g. -DCUDA_TOOLKIT_ROOT_DIR=...)
        if shutil.which("ninja"):
            args += ["-G", "Ninja"]
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.run(["cmake", str(ROOT), *args], cwd=build_dir, check=True)
        subprocess.run(["cmake", "--build", ".", "--config", cfg, "-j", jobs], cwd=build_dir, check=True)


def _has_csrc() -> bool:
    return any(p.suffix in {".cpp", ".cu"} for p in (ROOT / "csrc").rglob("*"))


setup(
    packages=[
        "ivl_fast",
        "ivl_fast.cli",
        "ivl_fast.decode",
        "ivl_fast.models",
        "ivl_fast.ops",
        "ivl_fast.serve",
        "ivl_fast.train",
        "ivl_fast.vocab",
        "ivl_fast.kernels",
    ],
    package_dir={"ivl_fast": "ivl_fast", "ivl_fast.kernels": "kernels"},
    package_data={"ivl_fast.serve": ["static/*.html"]},  # the chat page
    ext_modules=[CMakeExtension("ivl_fast._C")] if _has_csrc() else [],
    cmdclass={"build_ext": CMakeBuild},
)
