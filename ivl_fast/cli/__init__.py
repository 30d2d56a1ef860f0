"""The ``ivl-fast`` command line.

Subcommands, in ``--help`` order, one module each (``ivl_fast/cli/<name>.py`` with ``-`` as ``_``: its flags in
``add_parser``, its work in ``run``; tests/test_docs_text.py keeps this list equal to the parser's):

- ``generate``: IVL decoding from checkpoints
- ``eval``: lm-evaluation-harness tasks on a base + value pair
- ``serve``: an OpenAI-compatible server with continuous batching
- ``export-vllm``: the directory that ``vllm serve`` loads a pair from
- ``train``: a value network on a frozen base
- ``vocab-map``: a cross-vocabulary map
- ``demo``: the paper's transfer table in miniature
- ``make-tiny``: a random tiny base/value pair

Errors: bad input (a ValueError, such as ``UsageError``, or a TypeError, OSError, NotImplementedError,
FloatingPointError) ends the command with one line, ``ivl-fast <cmd>: error: ...``, and exit code 2 (argparse's
own convention for bad flags); ``IVL_FAST_DEBUG=1`` shows its traceback instead. Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import demo, export_vllm, generate, make_tiny, serve, train, vocab_map
from . import eval as eval_cmd
from .errors import UsageError

# bad input: one line and exit code 2, never a traceback
_ONE_LINE_ERRORS = (ValueError, TypeError, OSError, NotImplementedError, FloatingPointError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ivl-fast", description="Fast Inverse Value Learning")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (generate, eval_cmd, serve, export_vllm, train, vocab_map, demo, make_tiny):
        command.add_parser(sub)
    return parser


def _version() -> str:
    from .. import __version__

    return f"ivl-fast {__version__}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except _ONE_LINE_ERRORS as e:  # bad input: one line, exit code 2 (IVL_FAST_DEBUG=1: the traceback)
        if os.environ.get("IVL_FAST_DEBUG"):
            raise
        print(f"ivl-fast {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ivl-fast {args.command}: interrupted", file=sys.stderr)
        return 130


__all__ = ["UsageError", "build_parser", "main"]
