"""Errors a user can fix: every command prints them as one line and exits with status 2."""

from __future__ import annotations

import sys

from training.quiet import quiet


class UserError(ValueError):
    """Bad input or configuration: the message names the bad thing and what was expected."""


def run_command(command, cfg):
    """Call `command(cfg)`; a UserError ends the process with its one-line message instead of a traceback.
    Library output goes to a log file first, unless `verbose=true` (training/quiet.py)."""
    quiet(cfg)
    try:
        return command(cfg)
    except Exception as err:
        cause = _user_error(err)
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        sys.exit(2)


def _user_error(err: BaseException | None) -> UserError | None:
    """The UserError behind `err`, also when Hydra's instantiate wrapped it (it re-raises with a cause)."""
    while err is not None:
        if isinstance(err, UserError):
            return err
        err = err.__cause__ or err.__context__
    return None
