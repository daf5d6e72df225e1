"""Rich consoles whose tables stay readable when output goes to a pipe or a log file."""

from __future__ import annotations

import sys

from rich.console import Console

PIPE_WIDTH = 160  # rich assumes 80 columns off a terminal, which truncates the epoch table


def make_console(stderr: bool = False) -> Console:
    """A console as wide as the terminal, or PIPE_WIDTH columns when not on one."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else PIPE_WIDTH)
