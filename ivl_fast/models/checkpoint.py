"""Reading Hugging Face checkpoint directories: config.json plus safetensors (single file or sharded).

Pickled ``pytorch_model*.bin`` checkpoints are refused unless the caller passes ``allow_pickle=True``: unpickling
runs arbitrary code. Even then they are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


def checkpoint_dir(path: str | Path, *, what: str = "checkpoint") -> Path:
    """Return ``path`` as a directory holding ``config.json``, or raise a clear error."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{what} directory {str(p)!r} does not exist")
    if not p.is_dir():
        raise NotADirectoryError(f"{what} path {str(p)!r} is not a directory (expected a Hugging Face checkpoint dir)")
    if not (p / "config.json").is_file():
        raise FileNotFoundError(
            f"{what} directory {str(p)!r} has no config.json; expected a Hugging Face checkpoint "
            "(config.json + model.safetensors or model.safetensors.index.json)"
        )
    return p


def read_config(path: str | Path) -> dict:
    p = checkpoint_dir(path)
    return _read_json(p / "config.json")


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(obj).__name__}")
    return obj


def weight_files(path: str | Path, *, allow_pickle: bool = False) -> tuple[list[Path], str]:
    """The weight files of a checkpoint dir and their format ("safetensors" or "pickle")."""
    p = checkpoint_dir(path)
    if (p / SAFE_INDEX).is_file():
        index = _read_json(p / SAFE_INDEX)
        names = sorted(set(index.get("weight_map", {}).values()))
        missing = [n for n in names if not (p / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{p / SAFE_INDEX} lists shard(s) that are missing: {missing}")
        return [p / n for n in names], "safetensors"
    if (p / SAFE_SINGLE).is_file():
        return [p / SAFE_SINGLE], "safetensors"
    others = sorted(p.glob("*.safetensors"))
    if others:
        return others, "safetensors"
    bins = sorted(p.glob("pytorch_model*.bin"))
    if bins:
        if not allow_pickle:
            raise ValueError(
                f"checkpoint {str(p)!r} only has pickled weights ({bins[0].name}); pickle files can run arbitrary "
                "code when loaded, so they are refused. Convert the checkpoint to safetensors, or pass "
                "allow_pickle=True (CLI: --allow-pickle) if you trust its source."
            )
        if (p / BIN_INDEX).is_file():
            index = _read_json(p / BIN_INDEX)
            bins = [p / n for n in sorted(set(index.get("weight_map", {}).values()))]
        return bins, "pickle"
    raise FileNotFoundError(
        f"checkpoint {str(p)!r} has config.json but no weights (expected {SAFE_SINGLE} or {SAFE_INDEX})"
    )


def iter_tensors(path: str | Path, *, allow_pickle: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for every weight in the checkpoint, on CPU in its stored dtype."""
    files, fmt = weight_files(path, allow_pickle=allow_pickle)
    for f in files:
        if fmt == "safetensors":
            try:
                sf = safe_open(str(f), framework="pt", device="cpu")
            except Exception as e:  # SafetensorError derives from Exception only
                raise ValueError(f"cannot read safetensors file {str(f)!r} (corrupt or truncated?): {e}") from e
            with sf:
                for k in sf.keys():
                    yield k, sf.get_tensor(k)
        else:
            try:  # weights_only: tensors and plain values only; a pickle that would run code is refused
                sd = torch.load(str(f), map_location="cpu", weights_only=True)
            except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
                why = str(e).strip().splitlines()[0]
                raise ValueError(f"cannot load {str(f)!r} as tensors only (refused or damaged): {why}") from None
            yield from sd.items()
