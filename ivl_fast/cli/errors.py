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
        # identity, not ==: a default of 0 (== False) or 0.0 is a value to show, not an off switch
        if action.required or any(action.default is x for x in (None, False, argparse.SUPPRESS)) or "default" in text:
            return text
        return text + " (default: %(default)s)"
