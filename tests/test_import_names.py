"""The repository root never shadows an installed module.

`python -m pytest`, `python -c` and a REPL started in the root put the root first on `sys.path`, so a root folder
with an `__init__.py` or a root `*.py` file named like an installed top-level module replaces that module for the
whole process. transformers >= 5.25 imports Hugging Face's `kernels` with every model class; our root `kernels/`
once had an `__init__.py` and broke every such process (README.md, "Layout": why `kernels/` has no import name).
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the one package the repository provides at the top level, and the build script (run, never imported)
OWN_TOP_LEVEL = {"ivl_fast", "setup"}


def root_import_names(root: Path) -> set[str]:
    """Names a process started in ``root`` could import from it as a regular package or module."""
    names = {p.name for p in root.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    names |= {p.stem for p in root.glob("*.py")}
    return names


def test_root_import_names_are_found():
    # the scan must see the package and setup.py, or the checks below would pass on nothing
    assert {"ivl_fast", "setup"} <= root_import_names(ROOT)


def test_the_scan_flags_a_kernels_package(tmp_path):
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("")
    (tmp_path / "notes").mkdir()  # no __init__.py: a namespace folder, which any installed module outranks
    (tmp_path / "tool.py").write_text("")
    assert root_import_names(tmp_path) == {"kernels", "tool"}


def test_no_root_name_is_an_installed_distributions_module():
    provided = importlib.metadata.packages_distributions()  # top-level module name -> distributions
    clashes = {
        name: provided[name]
        for name in root_import_names(ROOT)
        if name in provided and set(provided[name]) != {"ivl-fast"}
    }
    assert not clashes, f"root names shadow installed modules: {clashes}"
    # the rule does not rest on what happens to be installed: the root holds nothing importable but our own
    assert root_import_names(ROOT) <= OWN_TOP_LEVEL, root_import_names(ROOT) - OWN_TOP_LEVEL


def _in_root(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_a_process_started_in_the_root_imports_every_transformers_model_class():
    code = (
        "import sys, transformers.activations, transformers; "
        "from transformers import LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM; "
        "import ivl_fast.kernels.aot, ivl_fast.ops; "
        "from pathlib import Path; import importlib.util as u; "
        "spec = u.find_spec('kernels'); "
        # with Hugging Face's kernels installed it is the one found; without it, at most our namespace folder
        "print('kernels:', None if spec is None else (spec.origin or list(spec.submodule_search_locations)))"
    )
    r = _in_root("-c", code)
    assert r.returncode == 0, r.stderr[-3000:]
    line = r.stdout.strip().splitlines()[-1]
    if "kernels" in importlib.metadata.packages_distributions():
        assert "site-packages" in line and str(ROOT / "kernels") not in line, line


def test_pytest_collects_in_the_root():
    r = _in_root("-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests/test_models.py")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "test_lean_matches_transformers_fp32" in r.stdout


@pytest.mark.parametrize("module", ["combine_and_sample", "fused_ce_l1", "aot"])
def test_kernel_modules_import_as_ivl_fast_kernels(module):
    # the folder is reached through the link ivl_fast/kernels -> ../kernels (a namespace package, no __init__.py)
    assert (ROOT / "ivl_fast" / "kernels").resolve() == (ROOT / "kernels").resolve()
    assert not (ROOT / "kernels" / "__init__.py").exists()
    r = _in_root("-c", f"import ivl_fast.kernels.{module} as m; print(m.__file__)")
    assert r.returncode == 0, r.stderr[-3000:]
    assert Path(r.stdout.strip()).resolve() == (ROOT / "kernels" / f"{module}.py").resolve()


def imported_top_level_names(*folders: Path) -> set[str]:
    """Top-level module names that ``import`` / ``from ... import`` statements (absolute ones) name in the files."""
    import ast

    names = set()
    for folder in folders:
        for path in folder.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    return names


def test_no_test_folder_is_named_like_a_module_the_code_imports():
    """pytest puts tests/ (and bench/) on sys.path: a folder there named ``vllm`` became a namespace package that
    ``pytest.importorskip("vllm")`` imported where vLLM is not installed, so tests that needed vLLM ran and failed
    instead of skipping (tests/on_vllm/ is why)."""
    imported = imported_top_level_names(ROOT / "ivl_fast", ROOT / "tests", ROOT / "bench")
    folders = {p.name for base in (ROOT / "tests", ROOT / "bench") for p in base.iterdir() if p.is_dir()}
    assert "vllm" in imported and not folders & imported, folders & imported
