"""Build driver for ivl-fast.

The package is Python plus Triton kernels plus the C++ extension ``ivl_fast._C``. The kernels live in ``kernels/``,
which ``ivl_fast/kernels`` links to and which installs as the namespace package ``ivl_fast.kernels``: the folder has
no ``__init__.py``, so the repository root never shadows Hugging Face's ``kernels`` (README.md, "Layout"). The
extension is described by CMakeLists.txt and built here by CMake from ``csrc/``: the vocabulary-map
DTW alignment (CPU), and with a CUDA build of torch the CUDA-graph replay runner (not yet validated on GPU).
Every op has a Python fallback, so the package also works without it. Environment: MAX_JOBS, NVCC_THREADS,
TORCH_CUDA_ARCH_LIST (default "8.0;9.0"), CMAKE_ARGS (extra CMake options), IVL_FAST_CUDA (with a CUDA build of
torch: "auto", the default, builds the CUDA parts when CMake finds the toolkit and else the CPU parts only, saying
so; "1" requires them; "0" builds the CPU parts only).
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

        target = Path(self.get_ext_fullpath(ext.name)).resolve()  # .../ivl_fast/_C.<abi>.so
        # one CMake cache and one output per torch build: a cache made against another torch (CPU vs CUDA) would be
        # reused, and a library built into a shared folder by another torch would look up to date to this one's
        # build (the wheel of one venv then shipped the other's library); the result is copied to the target below
        build_dir = Path(self.build_temp).resolve() / f"{ext.name}-torch{torch.__version__}"
        build_dir.mkdir(parents=True, exist_ok=True)
        cfg = "Debug" if self.debug else "Release"
        args = [
            f"-DCMAKE_PREFIX_PATH={cmake_prefix_path}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={build_dir / 'lib'}",
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
        cuda = os.environ.get("IVL_FAST_CUDA", "auto")
        if cuda not in {"auto", "0", "1"}:
            raise ValueError(f"IVL_FAST_CUDA must be auto, 0 or 1, got {cuda!r}")
        if torch.version.cuda is not None and cuda == "0":
            build_dir, args = _cpu_only(build_dir, args)
        try:
            subprocess.run(["cmake", str(ROOT), *args], cwd=build_dir, check=True)
        except subprocess.CalledProcessError:
            if torch.version.cuda is None or cuda != "auto":
                raise
            # pip's CUDA torch on a machine without the CUDA toolkit: the CPU parts still build, and the CUDA-graph
            # runner has a Python fallback; build_info() reports extension_build "cpu"
            print(
                "ivl-fast: torch is a CUDA build but its CMake package found no usable CUDA toolkit (see above): "
                "building the CPU parts of ivl_fast._C only. For the CUDA parts install the toolkit (nvcc) or point "
                "CMake at it (CMAKE_ARGS=-DCUDA_TOOLKIT_ROOT_DIR=...); IVL_FAST_CUDA=1 makes this an error.",
                file=sys.stderr,
            )
            build_dir, args = _cpu_only(build_dir, args)
            subprocess.run(["cmake", str(ROOT), *args], cwd=build_dir, check=True)
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.run(["cmake", "--build", ".", "--config", cfg, "-j", jobs], cwd=build_dir, check=True)
        (built,) = (build_dir / "lib").glob(f"_C{''.join(Path(target.name).suffixes)}")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(built, target)


def _cpu_only(build_dir: Path, args: list[str]) -> tuple[Path, list[str]]:
    """CMake arguments for the CPU sources against torch's headers and libraries, without torch's CMake package
    (CMakeLists.txt, IVL_TORCH_CPU_ONLY); its own build directory, so the failed CUDA configure is not reused."""
    import torch
    from torch.utils import cpp_extension

    build_dir = build_dir.with_name(build_dir.name + "-cpu-only")
    build_dir.mkdir(parents=True, exist_ok=True)
    lib_dir = cpp_extension.library_paths()[0]  # the paths only: CUDA libraries are asked for with cuda=True
    output = "-DCMAKE_LIBRARY_OUTPUT_DIRECTORY="
    return build_dir, [
        *(a for a in args if not a.startswith(output)),
        f"{output}{build_dir / 'lib'}",
        "-DIVL_TORCH_CPU_ONLY=ON",
        f"-DIVL_TORCH_VERSION={torch.__version__.split('+')[0]}",
        f"-DIVL_TORCH_INCLUDE_DIRS={';'.join(cpp_extension.include_paths())}",
        f"-DIVL_TORCH_LIBRARY_DIR={lib_dir}",
        f"-DIVL_TORCH_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
    ]


def _has_csrc() -> bool:
    return any(p.suffix in {".cpp", ".cu"} for p in (ROOT / "csrc").rglob("*"))


setup(
    packages=[
        "ivl_fast",
        "ivl_fast.cli",
        "ivl_fast.decode",
        "ivl_fast.demo",
        "ivl_fast.models",
        "ivl_fast.ops",
        "ivl_fast.serve",
        "ivl_fast.train",
        "ivl_fast.vocab",
        "ivl_fast.vllm",
        "ivl_fast.kernels",
    ],
    package_data={"ivl_fast.serve": ["static/*.html"]},  # the chat page
    ext_modules=[CMakeExtension("ivl_fast._C")] if _has_csrc() else [],
    cmdclass={"build_ext": CMakeBuild},
)
