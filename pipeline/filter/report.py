"""The filter's report: a funnel table (text), a funnel chart (PNG), and both in MLflow."""

from __future__ import annotations

import io


def funnel_table(funnel: list[dict]) -> str:
    total = funnel[0]["left"] or 1
    lines = [f"{'step':<24}{'dropped':>10}{'left':>10}{'left %':>9}"]
    for step in funnel:
        lines.append(f"{step['step']:<24}{step['dropped']:>10}{step['left']:>10}{100 * step['left'] / total:>8.1f}%")
    return "\n".join(lines)


def funnel_chart(funnel: list[dict], title: str = "") -> bytes:
    """Horizontal bars of rows left after each step, top to bottom in the order the rules ran."""
    import matplotlib

    matplotlib.use("Agg")  # no display on workers and CI
    import matplotlib.pyplot as plt

    steps = [s["step"] for s in funnel]
    left = [s["left"] for s in funnel]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(steps) + 1.2), dpi=100)
    bars = ax.barh(range(len(steps)), left, color="#4c72b0")
    ax.set_yticks(range(len(steps)), steps)
    ax.invert_yaxis()
    ax.set_xlabel("rows left")
    ax.set_title(f"filter funnel {title}".strip())
    for bar, step in zip(bars, funnel):
        label = f"{step['left']}" + (f"  (−{step['dropped']})" if step["dropped"] else "")
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, " " + label, va="center", fontsize=8)
    ax.set_xlim(0, max(left) * 1.25 or 1)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def log_filter(manifest: dict, chart: bytes, table_text: str) -> None:
    """Log into the active MLflow run (`pipeline.run`'s), or into a run of its own when there is none."""
    from training.tracking import mlflow_run, setup_mlflow

    mlflow = setup_mlflow()

    def log():
        for i, step in enumerate(manifest["funnel"]):
            mlflow.log_metric(f"funnel_left.{step['step']}", step["left"], step=i)
        mlflow.log_metrics({"filter.rows": manifest["counts"]["rows"], "filter.kept": manifest["counts"]["kept"]})
        mlflow.log_table(
            {
                "step": [s["step"] for s in manifest["funnel"]],
                "dropped": [s["dropped"] for s in manifest["funnel"]],
                "left": [s["left"] for s in manifest["funnel"]],
            },
            "filter/funnel.json",
        )
        mlflow.log_image(_png(chart), "filter/funnel.png")
        mlflow.log_text(table_text, "filter/funnel.txt")
        mlflow.set_tags(
            {"data.meta_hash": manifest["input_content_hash"], "data.selection_hash": manifest["content_hash"]}
        )

    if mlflow.active_run() is None:
        with mlflow_run("filter", config=manifest["config"], tags={"pixelmill.stage": "filter"}):
            log()
    else:
        log()


def _png(data: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(data))
