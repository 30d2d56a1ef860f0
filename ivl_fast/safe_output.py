"""Where ivl-fast may write, and what it may delete: never anything it did not create.

Every command that writes an output (``train --out``, ``vocab-map --out``, ``make-tiny --out``, ``demo
--work-dir``) goes through these checks before it touches the disk:

- :func:`check_output_location`: the output is not the current directory or one of its parents, not one of
  the command's inputs, and does not contain one (``--out`` equal to ``--base`` would overwrite the base).
- :func:`clear_owned_dir`: replacing a directory deletes only the entries its owner says it wrote (a marker
  file names them); anything else in it makes the whole call refuse, before anything is deleted.
- :func:`replace_file_atomically`: a file is written next to its target and renamed over it, so a crash leaves
  either the old file or the new one, never half of one.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path


class UnsafeOutputError(FileExistsError):
    """An output would overwrite or delete something ivl-fast did not create (nothing was touched)."""


def _paths(value) -> list[Path]:
    if value is None:
        return []
    if isinstance(value, str | os.PathLike):
        return [Path(value)]
    return [Path(v) for v in value]


def check_output_location(out, inputs: Mapping[str, object], *, flag: str = "--out") -> Path:
    """Refuse an output path that is the working directory (or above it), an input, or a parent of an input.

    ``inputs`` maps a flag name ("--base") to a path or a list of paths. Returns the resolved output path.
    """
    target = Path(out).expanduser().resolve()
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        which = "the current directory" if target == cwd else "a parent of the current directory"
        raise UnsafeOutputError(f"{flag} {str(out)!r} is {which}; give a new directory for the output")
    for name, value in inputs.items():
        for p in _paths(value):
            src = p.expanduser().resolve()
            if src == target:
                raise UnsafeOutputError(f"{flag} {str(out)!r} is the {name} input; give a new path for the output")
            if target in src.parents:
                raise UnsafeOutputError(
                    f"{flag} {str(out)!r} contains the {name} input {str(p)!r}; give a new path for the output"
                )
    return target


def check_owned_dir(directory, owned: Callable[[str], bool], *, flag: str, owner: str) -> list[str]:
    """The entries of ``directory``; UnsafeOutputError if any of them is not one ``owned(name)`` says ``owner``
    wrote."""
    d = Path(directory)
    entries = sorted(os.listdir(d))
    foreign = [e for e in entries if not owned(e)]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise UnsafeOutputError(
            f"{flag} {str(d)!r} holds files that {owner} did not write ({shown}); refusing to replace it "
            "(nothing was deleted): move them away or choose another path"
        )
    return entries


def clear_owned_dir(directory, owned: Callable[[str], bool], *, flag: str, owner: str) -> list[str]:
    """Delete the entries of ``directory`` that ``owned(name)`` says ``owner`` wrote; keep the directory.

    Refuses (UnsafeOutputError, nothing deleted) when any entry is not owned. Symbolic links are removed as
    links, never followed. Returns the names deleted.
    """
    d = Path(directory)
    entries = check_owned_dir(d, owned, flag=flag, owner=owner)
    for e in entries:
        p = d / e
        if p.is_symlink() or not p.is_dir():
            p.unlink()
        else:
            shutil.rmtree(p)
    return entries


def replace_file_atomically(path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` a temporary file beside ``path``, then rename it over ``path`` (removed on failure)."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
