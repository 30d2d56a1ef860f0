"""Where a figure came from: the command, the machine, the library versions and the code's commit.

Every results file the project writes (the demo's results.json, benchmark JSON) carries this record, so a number
can be traced to the run that produced it.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    """The commit of the checkout this package runs from (None when installed from a wheel)."""
    here = Path(__file__).resolve().parent
    try:
        r = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() or None if r.returncode == 0 else None


def git_dirty() -> bool | None:
    """True when tracked files differ from that commit (the figure then comes from uncommitted code). Results the
    benchmarks and the demo write (bench/results/, docs/) are outputs, not code: they do not count."""
    root = Path(__file__).resolve().parents[1]
    try:
        r = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--", "."]
            + [":(exclude)bench/results", ":(exclude)docs"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(r.stdout.strip()) if r.returncode == 0 else None


def provenance(command: str) -> dict:
    import tokenizers
    import torch
    import transformers

    from . import __version__

    device = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        device["gpu"] = torch.cuda.get_device_name()
    return {
        "command": command,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": device,
        "versions": {
            "ivl_fast": __version__,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            **_installed("vllm", "lm-eval"),  # where present: the engines a figure may come from
        },
        "commit": git_commit(),
        "dirty": git_dirty(),
    }


def _installed(*names: str) -> dict:
    """{distribution: version} of those of ``names`` that are installed (metadata only: nothing is imported)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found
