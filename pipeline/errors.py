"""Errors a user can fix; the command line prints them as one line and exits with status 2.

One definition for the whole project (training's, the core package): a stage's StageError is a UserError."""

from __future__ import annotations

from training.errors import UserError as StageError
from training.errors import run_command as run_stage

__all__ = ["StageError", "run_stage"]
