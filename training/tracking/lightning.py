"""Lightning's logger interface over a `TrackedRun`, in place of Lightning's MLFlowLogger: that one calls the
server inside the training step, so a server that is down stalls each step in MLflow's retries and, past the
retry window, ends the run with a traceback."""

from __future__ import annotations

import re
from argparse import Namespace

from pytorch_lightning.loggers.logger import Logger
from pytorch_lightning.utilities import rank_zero_only

from training.tracking.journaled import TrackedRun


class TrackedRunLogger(Logger):
    """Logs on global rank 0 into `run`; `run` is None on the other ranks (they log nothing)."""

    def __init__(self, run: TrackedRun | None, experiment: str):
        super().__init__()
        self.run, self._experiment = run, experiment

    @property
    def experiment(self) -> TrackedRun | None:
        return self.run

    @property
    def run_id(self) -> str | None:
        return self.run.run_id if self.run else None

    @property
    def name(self) -> str:
        return self._experiment

    @property
    def version(self) -> str:
        return self.run_id or ""

    @property
    def save_dir(self) -> None:
        return None

    @rank_zero_only
    def log_hyperparams(self, params: dict | Namespace, *args, **kwargs) -> None:
        from training.tracking import flatten

        if self.run is not None:
            self.run.log_params(flatten(vars(params) if isinstance(params, Namespace) else dict(params)))

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.run is not None:
            # MLflow keys allow letters, digits, `_ / . -` and spaces.
            clean = {
                re.sub(r"[^a-zA-Z0-9_/. -]+", "", k): float(v) for k, v in metrics.items() if not isinstance(v, str)
            }
            self.run.log_metrics(clean, step)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if self.run is not None:
            self.run.close("FINISHED" if status in ("success", "finished") else "FAILED")
            self.run = None  # Lightning may finalize twice (fit, then teardown)
