"""What every subcommand shares: the usage error and the help format."""

from __future__ import annotations

import argparse


class UsageError(ValueError):
    """A flag combination the command refuses (one line, exit code 2)."""


HELP = argparse.ArgumentDefaultsHelpFormatter  # every flag's help shows its default
