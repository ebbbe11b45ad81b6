"""What an evaluation shows: a per-class table, a confusion-matrix picture, the MLflow run, a summary."""

from __future__ import annotations

import json
import math
import os

import numpy as np

from training.tracking import sweep_parent_run, tracked_run


def per_class_table(classnames: list[str], result: dict) -> dict[str, list]:
    recall = result["per_class_recall"]
    return {
        "class": list(classnames),
        "support": [int(n) for n in result["support"]],
        "recall": [None if math.isnan(r) else float(r) for r in recall],
    }


def confusion_figure(classnames: list[str], confusion: np.ndarray):
    """Row-normalised confusion matrix (rows: true class) with counts written in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(classnames)
    side = min(4 + 0.45 * n, 30)
    figure, axes = plt.subplots(figsize=(side, side * 0.9))
    rows = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
    axes.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    axes.set_xticks(range(n), classnames, rotation=60, ha="right", fontsize=8)
    axes.set_yticks(range(n), classnames, fontsize=8)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if confusion[i, j]:
                    axes.text(
                        j,
                        i,
                        int(confusion[i, j]),
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if rows[i, j] > 0.5 else "black",
                    )
    figure.tight_layout()
    return figure


def model_tags(model: str, role: str = "model") -> dict[str, str]:
    """`pixelmill.<role>` (the folder) and `pixelmill.<role>_run_id`: the training run that exported it, read
    from `mlflow_run.json` in the training output the folder sits in (`<output>/clip`, `<output>/pipeline`)."""
    tags = {f"pixelmill.{role}": os.path.abspath(model)}
    run_file = os.path.join(os.path.dirname(os.path.abspath(model)), "mlflow_run.json")
    if os.path.exists(run_file):
        tags[f"pixelmill.{role}_run_id"] = json.load(open(run_file))["run_id"]
    return tags


def log_evaluation(record: dict, config: dict, tables: dict, figures: dict, tags: dict, output: str) -> str | None:
    """One MLflow run in the task's experiment (a child of the sweep's run in a Hydra multirun), journaled
    beside `output` (the results file); returns its id (None while the server is away)."""
    task = record["task"]
    name = f"{task} {record['dataset']}"
    folder = os.path.dirname(os.path.abspath(output))
    tags = {**tags, "pixelmill.task": task}
    with tracked_run(name, folder, config=config, tags=tags, parent_run_id=sweep_parent_run(task), task=task) as run:
        run.log_metrics({k: v for k, v in record["metrics"].items() if not math.isnan(v)})
        run.log_metric("samples", record["samples"])
        for artifact, table in tables.items():
            run.log_table(table, artifact_file=artifact)
        for artifact, figure in figures.items():
            run.log_figure(figure, artifact)
        run.log_dict(record, "results.json")
        return run.run_id


def print_summary(record: dict, output: str) -> None:
    print(f"\n{record['task']} · {record['dataset']} · {record['samples']} samples · {record['model']}")
    for name, value in record["metrics"].items():
        print(f"  {name:<32} {value:.4f}")
    print(f"  results: {output}")
