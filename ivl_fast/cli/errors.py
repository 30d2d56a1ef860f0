"""What every subcommand shares: the usage error and the help format."""

from __future__ import annotations

import argparse


class UsageError(ValueError):
    """A flag combination the command refuses (one line, exit code 2)."""


class DefaultsHelp(argparse.HelpFormatter):
    """Help that shows each flag's default, unless there is none to show (None, an off switch) or the help text
    already says it."""

    def _get_help_string(self, action) -> str:
        text = action.help or ""
        if action.required or action.default in (None, False, argparse.SUPPRESS) or "default" in text:
            return text
        return text + " (default: %(default)s)"
