"""What a DrawBench-style evaluation shows: `results.json`, a self-contained `report.html` (images inlined),
one grid per category, and an MLflow run (metrics per category, the table with images, the grids)."""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import textwrap

from PIL import Image, ImageDraw, ImageFont

from evaluation.report import model_tags
from training.tracking import sweep_parent_run, tracked_run

COLUMNS = (
    ("clip_score", "CLIPScore"),
    ("correct", "correct"),
    ("empty_prompt_correct", "correct with the empty prompt"),
    ("gain_over_empty", "gain over the empty prompt"),
    ("colour", "colour"),
    ("count", "count"),
    ("position", "position"),
    ("baseline_clip_score", "baseline CLIPScore"),
    ("win", "win rate"),
    ("win_correct", "win rate (correct)"),
)


def thumbnail(path: str, side: int) -> Image.Image:
    image = Image.open(path).convert("RGB")
    image.thumbnail((side, side))
    return image


def category_grid(record: dict, category: str, prompts: int, side: int, label_width: int = 320) -> Image.Image:
    """Rows: the category's first `prompts` prompts, each labelled; columns: the model's images, then the
    baseline's."""
    rows = [r for r in record["rows"] if r["category"] == category]
    texts = list(dict.fromkeys(r["prompt"] for r in rows))[:prompts]
    columns = record["generation"]["n"] * (2 if record["baseline"] else 1)
    gap = 4
    grid = Image.new("RGB", (label_width + columns * (side + gap) + gap, len(texts) * (side + gap) + gap), "white")
    pen, font = ImageDraw.Draw(grid), ImageFont.load_default(size=13)
    for y, text in enumerate(texts):
        top = gap + y * (side + gap)
        lines = textwrap.wrap(text, width=label_width // 7)[: max(1, side // 16)]
        pen.multiline_text((gap, top), "\n".join(lines), fill="black", font=font, spacing=3)
        own = [r for r in rows if r["prompt"] == text]
        paths = [r["image"] for r in own] + [r["baseline_image"] for r in own if "baseline_image" in r]
        for x, path in enumerate(paths):
            image = Image.open(path).convert("RGB").resize((side, side), Image.Resampling.NEAREST)
            grid.paste(image, (label_width + gap + x * (side + gap), top))
    return grid


def data_uri(image: Image.Image) -> str:
    """PNG for small pictures (exact pixels), JPEG for large ones (a page of SD-sized images stays small)."""
    buffer = io.BytesIO()
    kind = "png" if max(image.size) <= 64 else "jpeg"
    image.save(buffer, format=kind.upper(), **({"quality": 85} if kind == "jpeg" else {}))
    return f"data:image/{kind};base64," + base64.b64encode(buffer.getvalue()).decode()


def _cell(value) -> str:
    if isinstance(value, dict):
        return f"{value['mean']:.3f} <small>[{value['low']:.3f}, {value['high']:.3f}]</small>"
    if isinstance(value, bool):
        return "✓" if value else "✗"
    return "" if value is None else f"{value:.3f}" if isinstance(value, float) else html.escape(str(value))


def html_page(record: dict, grids: dict[str, Image.Image], thumbs: dict[str, Image.Image], side: int) -> str:
    summary = record["categories"]
    shown = [(key, title) for key, title in COLUMNS if any(key in entry for entry in summary.values())]
    head = "".join(f"<th>{title}</th>" for _, title in shown)
    body = "".join(
        f"<tr><td>{html.escape(c)}</td><td>{e['prompts']}</td>"
        + "".join(f"<td>{_cell(e.get(k))}</td>" for k, _ in shown)
        + "</tr>"
        for c, e in summary.items()
    )
    sections = []
    for category, grid in grids.items():
        rows = [r for r in record["rows"] if r["category"] == category]
        titles = [
            "prompt",
            "seed",
            "image",
            *(["baseline"] if record["baseline"] else []),
            *(t for k, t in shown if k in rows[0]),
            "failed checks",
        ]
        lines = (
            "<tr>"
            + "".join(f"<th>{t}</th>" for t in titles)
            + "</tr>"
            + "".join(
                f"<tr><td>{html.escape(r['prompt'])}</td><td>{r['seed']}</td>"
                f"<td><img src='{data_uri(thumbs[r['image']])}'></td>"
                + (f"<td><img src='{data_uri(thumbs[r['baseline_image']])}'></td>" if "baseline_image" in r else "")
                + "".join(f"<td>{_cell(r.get(k))}</td>" for k, _ in shown if k in r)
                + f"<td>{html.escape(r.get('reasons', ''))}</td></tr>"
                for r in rows
            )
        )
        sections.append(
            f"<h2>{html.escape(category)}</h2><img class='grid' alt='{html.escape(category)} grid' "
            f"src='{data_uri(grid)}'><details><summary>{len(rows)} images</summary>"
            f"<table>{lines}</table></details>"
        )
    meta = {k: record[k] for k in ("model", "baseline", "judge", "dataset", "samples")}
    meta.update({k: v for k, v in record["generation"].items() if v is not None})
    meta = {k: v for k, v in meta.items() if v is not None}
    warning = (
        f"<p class='warning'><b>Warning:</b> {html.escape(record['judge_note'])}</p>"
        if record.get("judge_independent") is False
        else ""
    )
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>DrawBench · {html.escape(record["dataset"])}</title>
<style>body{{font-family:sans-serif;margin:2em;color:#222}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}th{{background:#eef}}
.warning{{background:#fff3cd;border:1px solid #e0b000;padding:6px 10px}}
img{{image-rendering:pixelated;width:{side}px}}img.grid{{width:auto;max-width:100%;border:1px solid #999}}</style></head>
<body><h1>DrawBench-style evaluation · {html.escape(record["dataset"])}</h1>
<p>{" · ".join(f"<b>{html.escape(k)}</b> {html.escape(str(v))}" for k, v in meta.items())}</p>{warning}
<table><tr><th>category</th><th>prompts</th>{head}</tr>{body}</table>
<p>Means over prompts with {record["confidence"]:.0%} bootstrap intervals (prompts resampled; for the
empty-prompt columns, prompts and seeds). Grids: one row per prompt; the model's images, then the
baseline's.</p>{"".join(sections)}</body></html>"""


def mlflow_table(record: dict, thumbs: dict[str, Image.Image]) -> dict[str, list]:
    keys = [k for k, _ in COLUMNS if k in record["rows"][0]]
    table = {
        "prompt": [r["prompt"] for r in record["rows"]],
        "category": [r["category"] for r in record["rows"]],
        "seed": [r["seed"] for r in record["rows"]],
        "image": [thumbs[r["image"]] for r in record["rows"]],
    }
    table.update({k: [r.get(k) for r in record["rows"]] for k in keys})
    return table


def write_report(record: dict, output: str, config: dict, report_cfg, tracking: bool) -> None:
    side = int(report_cfg.thumbnail)
    record["confidence"] = float(report_cfg.confidence)
    grids = {
        c: category_grid(record, c, int(report_cfg.grid_prompts), side) for c in record["categories"] if c != "all"
    }
    paths = [r[k] for r in record["rows"] for k in ("image", "baseline_image") if k in r]
    thumbs = {path: thumbnail(path, side) for path in dict.fromkeys(paths)}  # each image read once
    os.makedirs(os.path.join(output, "grids"), exist_ok=True)
    for category, grid in grids.items():
        grid.save(os.path.join(output, "grids", f"{category.replace('/', '_')}.png"))
    with open(os.path.join(output, "results.json"), "w") as f:
        json.dump(record, f, indent=2)
    with open(os.path.join(output, "report.html"), "w") as f:
        f.write(html_page(record, grids, thumbs, side))
    if tracking:
        tags = {
            **model_tags(record["model"]),
            **(model_tags(record["baseline"], "baseline") if record["baseline"] else {}),
            "pixelmill.judge": os.path.abspath(record["judge"]),
            "pixelmill.judge_independent": str(record["judge_independent"]).lower(),
            "pixelmill.task": "drawbench",
        }
        with tracked_run(
            f"drawbench {record['dataset']}",
            output,
            config=config,
            tags=tags,
            parent_run_id=sweep_parent_run("drawbench"),
            task="drawbench",
        ) as run:
            run.log_metrics({k: v for k, v in record["metrics"].items() if not math.isnan(v)})
            run.log_table(mlflow_table(record, thumbs), artifact_file="drawbench_table.json")
            for category, grid in grids.items():
                run.log_image(grid, f"grids/{category.replace('/', '_')}.png")
            run.log_artifact(os.path.join(output, "report.html"))
            run.log_artifact(os.path.join(output, "results.json"))
    print_summary(record, output)


def print_summary(record: dict, output: str) -> None:
    print(
        f"\ndrawbench · {record['dataset']} · {record['samples']} images · {record['model']}"
        + (f" vs {record['baseline']}" if record["baseline"] else "")
    )
    keys = [k for k, _ in COLUMNS if k in record["categories"]["all"]]
    print(f"  {'category':<22}{'prompts':>8}" + "".join(f"{k:>22}" for k in keys))
    for category, entry in record["categories"].items():
        cells = "".join(
            f"{entry[k]['mean']:>8.3f} [{entry[k]['low']:.2f},{entry[k]['high']:.2f}]" if k in entry else " " * 22
            for k in keys
        )
        print(f"  {category:<22}{entry['prompts']:>8}{cells}")
    print(f"  images drawn now: {record['generated']} · report: {output}/report.html")
    print(f"  {'' if record['judge_independent'] else 'warning: '}{record['judge_note']}")
