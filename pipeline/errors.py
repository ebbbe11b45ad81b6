"""Errors a user can fix; the command line prints them as one line and exits with status 2.

One definition for the whole project (training's, the core package): a stage's StageError is a UserError, and
a full disk is reported by the same DiskFullError in stages and in training."""

from __future__ import annotations

from training.errors import DiskFullError, disk_full, is_disk_full
from training.errors import UserError as StageError
from training.errors import run_command as run_stage

__all__ = ["DiskFullError", "StageError", "disk_full", "is_disk_full", "run_stage"]
