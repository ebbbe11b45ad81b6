"""Errors a user can fix; the command line prints them as one line and exits with status 2."""

from __future__ import annotations

import sys


class StageError(ValueError):
    """Bad input or configuration: the message names the bad thing and what was expected."""


def run_stage(stage, cfg):
    """Call `stage(cfg)`; a StageError ends the process with its one-line message instead of a traceback."""
    try:
        return stage(cfg)
    except StageError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
