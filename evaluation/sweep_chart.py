"""A Hydra callback for multiruns: when the sweep ends, each job's metrics against the swept value, as a chart
and a table on the sweep's parent MLflow run (the run every job of the sweep is a child of).

Wired in by config (`hydra.callbacks.sweep_chart._target_: evaluation.sweep_chart.SweepChart`), e.g. on
`pipeline.run`, where a sweep over `filter.clip_score.top_fraction` with `+sweep_model=clip_zeroshot` charts
zero-shot accuracy against the threshold.
"""

from __future__ import annotations

import os

from hydra.experimental.callback import Callback


def swept_keys(overrides: list[str]) -> list[str]:
    """Keys a multirun sweeps: overrides with several values (`a.b=1,2,3`)."""
    keys = []
    for override in overrides:
        key, _, value = override.partition("=")
        if "," in value and not value.startswith("["):
            keys.append(key.lstrip("+~"))
    return keys


def _number(text: str):
    try:
        return float(text)
    except ValueError:
        return text


class SweepChart(Callback):
    def __init__(self, metrics: list[str] | tuple[str, ...] = ("zeroshot.",), task: str | None = None):
        self.metrics, self.task = tuple(metrics), task

    def on_multirun_end(self, config, **kwargs) -> None:
        from training.tracking import SWEEP_TAG, experiment_name, setup_mlflow, tracking_uri
        from training.tracking.journaled import TrackedRun
        from training.tracking.probe import unreachable

        if reason := unreachable(tracking_uri()):  # the chart is read from the jobs' runs: it needs the server
            print(f"warning: no sweep chart: MLflow at {tracking_uri()} is not answering ({reason})")
            return
        mlflow = setup_mlflow(self.task)
        client = mlflow.MlflowClient()
        experiment = mlflow.get_experiment_by_name(experiment_name(self.task))
        sweep = os.path.abspath(config.hydra.sweep.dir)
        parents = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = '{sweep}'")
        if not parents:
            return
        parent = parents[0].info.run_id
        jobs = client.search_runs([experiment.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
        keys = [k for k in swept_keys(list(config.hydra.overrides.task)) if all(k in j.data.params for j in jobs)]
        names = sorted({m for j in jobs for m in j.data.metrics if m.startswith(self.metrics)})
        if not keys or not names:
            return
        key = keys[0]
        jobs = sorted(jobs, key=lambda j: (isinstance(_number(j.data.params[key]), str), _number(j.data.params[key])))
        table = {key: [j.data.params[key] for j in jobs], **{n: [j.data.metrics.get(n) for j in jobs] for n in names}}
        run = TrackedRun.start("sweep", sweep, experiment_name(self.task), run_id=parent)
        run.log_dict(table, "sweep.json")  # {swept key: values, metric: values, …}
        run.log_figure(self.figure(key, table, names), "sweep.png")
        run.close("FINISHED")
        print(f"\nsweep over {key} ({len(jobs)} jobs): chart and table on MLflow run {parent}")
        for i, value in enumerate(table[key]):
            print(f"  {key}={value}: " + ", ".join(f"{n} {table[n][i]:.4f}" for n in names if table[n][i] is not None))

    @staticmethod
    def figure(key: str, table: dict, names: list[str]):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axes = plt.subplots(figsize=(6, 4))
        values = [_number(v) for v in table[key]]
        numeric = all(not isinstance(v, str) for v in values)
        for name in names:
            points = [float("nan") if v is None else v for v in table[name]]  # a job without a model: a gap
            axes.plot(values if numeric else range(len(values)), points, marker="o", label=name)
        if not numeric:
            axes.set_xticks(range(len(values)), table[key])
        axes.set_xlabel(key)
        axes.legend(fontsize=8)
        axes.grid(alpha=0.3)
        figure.tight_layout()
        return figure
