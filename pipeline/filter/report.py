"""The filter's report: a funnel table (text) and chart (PNG), a grid of sample pairs per duplicate rule
(`pairs_<rule>.png`), the eps table of a rule that has one (`eps_<rule>.txt` and `.json`), and all of it in
MLflow under `filter/`."""

from __future__ import annotations

import io
import json
from typing import TYPE_CHECKING

from pipeline.filter.pairs import pair_grid
from pipeline.storage import Location

if TYPE_CHECKING:
    from pipeline.filter.run import FilterOutcome

PAIRS, EPS = "pairs_", "eps_"  # name prefixes of the per-rule report files


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


def write_report(out: Location, outcome: FilterOutcome, meta: dict, title: str = "") -> dict[str, bytes]:
    """Write the report files into `out`; returns name → bytes written. Pair grids need annotate's
    `thumbnail` column: without it they are skipped, with a line saying so."""
    for name in out.listdir():  # an earlier run's grids and tables, perhaps of rules no longer configured
        if name.startswith((PAIRS, EPS)):
            out.remove(name)
    files = {
        "funnel.txt": (funnel_table(outcome.funnel) + "\n").encode(),
        "funnel.png": funnel_chart(outcome.funnel, title),
    }
    found = [p for p in outcome.pairs if len(p.dropped)]
    if found and "thumbnail" not in meta:
        print(
            f"filter: no pair grids for {', '.join(p.rule for p in found)}: "
            "the metadata has no thumbnail column (annotate it again with this version)"
        )
    elif found:
        for pairs in found:
            files[f"{PAIRS}{pairs.rule}.png"] = pair_grid(pairs, meta["thumbnail"], meta["key"])
    if outcome.eps_tables:
        from pipeline.filter.semantic import format_eps_table

        for rule, rows in outcome.eps_tables.items():
            files[f"{EPS}{rule}.txt"] = (format_eps_table(rows) + "\n").encode()
            files[f"{EPS}{rule}.json"] = json.dumps(rows, indent=2).encode()
    for name, data in files.items():
        with out.open_atomic(name) as f:
            f.write(data)
    return files


def log_filter(manifest: dict, chart: bytes, table_text: str) -> None:
    """Log into the open MLflow run (`pipeline.run`'s), or into a run of its own when there is none. The
    per-rule files are read back from the output, which the manifest's `report` lists, so that a caller
    that finds the filter already complete logs them too."""
    from training.tracking import current_run, tracked_run

    out = Location(manifest["config"]["output"])
    per_rule = {}
    for name in manifest.get("report", {}):
        if name.startswith((PAIRS, EPS)):
            with out.fs.open(out.path(name), "rb") as f:
                per_rule[name] = f.read()

    def log(run):
        for i, step in enumerate(manifest["funnel"]):
            run.log_metric(f"funnel_left.{step['step']}", step["left"], step=i)
        run.log_metrics({"filter.rows": manifest["counts"]["rows"], "filter.kept": manifest["counts"]["kept"]})
        run.log_table(
            {
                "step": [s["step"] for s in manifest["funnel"]],
                "dropped": [s["dropped"] for s in manifest["funnel"]],
                "left": [s["left"] for s in manifest["funnel"]],
            },
            "filter/funnel.json",
        )
        run.log_image(chart, "filter/funnel.png")
        run.log_text(table_text, "filter/funnel.txt")
        for name, data in per_rule.items():
            if name.endswith(".png"):
                run.log_image(data, f"filter/{name}")
            elif name.endswith(".txt"):
                run.log_text(data.decode(), f"filter/{name}")
            elif rows := json.loads(data):
                run.log_table({column: [row[column] for row in rows] for column in rows[0]}, f"filter/{name}")
        run.set_tags(
            {"data.meta_hash": manifest["input_content_hash"], "data.selection_hash": manifest["content_hash"]}
        )

    if current_run() is None:
        output = manifest["config"]["output"]
        with tracked_run("filter", output, config=manifest["config"], tags={"pixelmill.stage": "filter"}) as run:
            log(run)
    else:
        log(current_run())
