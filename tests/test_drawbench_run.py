"""`python -m evaluation.run benchmark=drawbench` end to end on a tiny pipeline: the official 200 prompts with a
baseline, a rerun that draws nothing, MLflow, the HTML report in headless Chromium, the world suite, bad input."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from evaluation.run import evaluate
from evaluation.t2i.prompt_suites import WORLD_CATEGORIES
from support import (
    CONF,
    DRAWBENCH_COUNTS,
    DRAWBENCH_CSV,
    ROOT,
    drawbench_like_csv,
    eval_config,
    needs_official_drawbench,
    subprocess_env,
)
from training.errors import UserError

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory, tiny_clip) -> str:
    """A random debug-size StableDiffusionPipeline folder on the tiny CLIP's text encoder, laid out as
    `training.train task=ldm` leaves it: `<output>/pipeline` with `lineage.json` naming the CLIP beside it."""
    from hydra.utils import instantiate

    from training.diffusion.export import assemble_pipeline
    from training.diffusion.unet import load_text_encoder, noise_scheduler
    from training.recipe import write_lineage

    torch.manual_seed(0)
    text_encoder, tokenizer = load_text_encoder(tiny_clip)
    vae = instantiate(OmegaConf.load(CONF / "model" / "vae_tiny.yaml"))
    unet = instantiate(
        OmegaConf.load(CONF / "model" / "unet_tiny.yaml"),
        sample_size=8,
        in_channels=4,
        cross_attention_dim=text_encoder.config.hidden_size,
    )
    task = OmegaConf.load(CONF / "task" / "ldm.yaml")
    schedule = noise_scheduler(**{k: v for k, v in task.noise_scheduler.items() if k != "_target_"})
    output = tmp_path_factory.mktemp("t2i")
    assemble_pipeline(unet, vae, text_encoder, tokenizer, schedule).save_pretrained(output / "pipeline")
    write_lineage(str(output), {"clip": tiny_clip})
    return str(output / "pipeline")


def drawbench_args(model, output, *extra):
    return [
        "benchmark=drawbench",
        f"pipeline={model}",
        f"output={output}",
        "generation.n=1",
        "generation.steps=2",
        "generation.batch_size=50",
        "report.bootstrap=200",
        *extra,
    ]


@pytest.fixture(scope="module")
def official_run(tiny_pipeline, tmp_path_factory):
    """All 200 DrawBench prompts, one image each, against a copy of the same model as the baseline. Without
    the official prompts beside the clone, a stand-in CSV of the same shape (the official-only test skips)."""
    folder = tmp_path_factory.mktemp("drawbench")
    prompts = DRAWBENCH_CSV if DRAWBENCH_CSV.exists() else drawbench_like_csv(folder / "drawbench_like.csv")
    baseline = folder / "copy" / "pipeline"
    shutil.copytree(tiny_pipeline, baseline)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder}/mlflow.db"
    try:
        args = drawbench_args(tiny_pipeline, folder / "out", f"baseline={baseline}", f"prompts={prompts}")
        record = evaluate(eval_config(*args))
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]
    return {"record": record, "args": args, "folder": folder}


@needs_official_drawbench
def test_official_prompts_give_the_11_categories_and_self_against_self_is_even(official_run, tiny_clip):
    record = official_run["record"]
    assert {c: e["prompts"] for c, e in record["categories"].items() if c != "all"} == DRAWBENCH_COUNTS
    assert record["categories"]["all"]["prompts"] == 200 and record["samples"] == 200
    assert record["generated"] == {"model": 200, "baseline": 200}
    assert record["judge"] == tiny_clip  # no judge= given: the CLIP named in lineage.json
    scores = np.array([r["clip_score"] for r in record["rows"]])
    assert ((scores >= 0) & (scores <= 2.5)).all() and scores.std() > 0
    ties = np.mean([r["win"] == 0.5 for r in record["rows"]])
    print(f"model vs its copy: {ties:.0%} of pairs tied; win rate {record['metrics']['win/all']:.3f}")
    for category, entry in record["categories"].items():
        assert abs(entry["win"]["mean"] - 0.5) <= 0.05, category
        assert entry["clip_score"]["low"] <= entry["clip_score"]["mean"] <= entry["clip_score"]["high"]
    saved = json.load(open(official_run["folder"] / "out" / "results.json"))
    assert saved["metrics"] == pytest.approx(record["metrics"], nan_ok=True)


def test_a_rerun_draws_nothing_and_gives_the_same_numbers(official_run):
    images = sorted((official_run["folder"] / "out" / "images").rglob("*.png"))
    stamps = {p: p.stat().st_mtime_ns for p in images}
    assert len(images) == 400
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{official_run['folder']}/mlflow.db"
    try:
        again = evaluate(eval_config(*official_run["args"]))
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]
    assert again["generated"] == {"model": 0, "baseline": 0}
    assert {p: p.stat().st_mtime_ns for p in images} == stamps
    assert again["metrics"] == pytest.approx(official_run["record"]["metrics"])


def test_mlflow_holds_metrics_per_category_the_table_and_the_grids(official_run):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{official_run['folder']}/mlflow.db")
    experiment = mlflow.get_experiment_by_name("pixelmill-drawbench")
    run = mlflow.MlflowClient().search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])[0]
    record = official_run["record"]
    for category in [*DRAWBENCH_COUNTS, "all"]:
        assert run.data.metrics[f"clip_score/{category}"] == pytest.approx(record["metrics"][f"clip_score/{category}"])
        assert run.data.metrics[f"win/{category}"] == pytest.approx(0.5, abs=0.05)
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"drawbench_table.json", "report.html", "results.json", "grids"} <= artifacts
    grids = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "grids")}
    assert len(grids) == 11
    table = mlflow.MlflowClient().load_table(experiment.experiment_id, "drawbench_table.json", [run.info.run_id])
    assert len(table) == 200 and {"prompt", "category", "seed", "image", "clip_score", "win"} <= set(table.columns)
    assert run.data.tags["pixelmill.model"] == record["model"] and "pixelmill.baseline" in run.data.tags


@pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("PIXELMILL_REQUIRE_CHROMIUM"),
    reason="no Chromium here; `make test` installs Debian's chromium when it runs as root",
)
def test_html_report_renders_in_headless_chromium(official_run, tmp_path):
    assert CHROMIUM, "PIXELMILL_REQUIRE_CHROMIUM is set but no chromium is on PATH"
    report = official_run["folder"] / "out" / "report.html"
    shot = tmp_path / "report.png"
    subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--hide-scrollbars",
            "--window-size=1280,1400",
            f"--screenshot={shot}",
            report.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape == (1400, 1280, 3)
    ink = (pixels < 200).any(-1).mean()  # text, table lines, pictures
    colour = ((pixels.max(-1) - pixels.min(-1)) > 60).mean()  # the generated images in the first grid
    print(f"screenshot: {ink:.1%} inked, {colour:.1%} coloured")
    assert ink > 0.03 and colour > 0.005


def test_world_suite_scores_with_the_checkers(tiny_pipeline, tmp_path, capfd):
    record = evaluate(
        eval_config(
            *drawbench_args(
                tiny_pipeline,
                tmp_path / "out",
                "prompts=world",
                "world_suite.per_category=3",
                "generation.n=2",
                "tracking=false",
                "progress=false",
            )
        )
    )
    console = capfd.readouterr()
    assert "batch/s" not in console.err + console.out  # progress=false: no bar while drawing or scoring
    assert "drawbench · world" in console.out  # the summary still prints
    assert list(record["categories"]) == [*WORLD_CATEGORIES, "all"]
    assert record["samples"] == 5 * 3 * 2
    assert all("correct" in e and "clip_score" in e for e in record["categories"].values())
    assert "count" in record["categories"]["Counting"] and "count" not in record["categories"]["Colors"]
    assert all(isinstance(r["correct"], bool) and (r["correct"] or r["reasons"]) for r in record["rows"])
    # The empty prompt's image of the row's seed, judged against the row's truth; the gain pairs the two.
    assert all(r["gain_over_empty"] == r["correct"] - r["empty_prompt_correct"] for r in record["rows"])
    gain = record["categories"]["all"]["gain_over_empty"]
    assert gain["low"] <= gain["mean"] <= gain["high"]
    assert record["metrics"]["gain_over_empty/all"] == pytest.approx(
        record["metrics"]["correct/all"] - record["metrics"]["empty_prompt_correct/all"]
    )
    html = (tmp_path / "out" / "report.html").read_text()
    assert "Conflicting" in html and "failed checks" in html


def test_bad_input_fails_in_one_line(tiny_pipeline, tmp_path):
    stray = tmp_path / "elsewhere" / "pipeline"
    shutil.copytree(tiny_pipeline, stray)
    cases = [
        ([f"pipeline={tmp_path}"], f"pipeline={tmp_path} is not a diffusers pipeline folder"),
        (
            [f"pipeline={tiny_pipeline}", f"baseline={tmp_path}"],
            f"baseline={tmp_path} is not a diffusers pipeline folder",
        ),
        ([f"pipeline={stray}"], "judge=<CLIP folder> is needed"),
        ([f"pipeline={tiny_pipeline}", f"judge={tmp_path}"], f"judge={tmp_path} is not a transformers CLIP folder"),
        ([f"pipeline={tiny_pipeline}", f"prompts={tmp_path / 'none.csv'}"], "none.csv: no such file"),
        ([f"pipeline={tiny_pipeline}", "prompts=world", "generation.n=0"], "generation.n=0"),
    ]
    for overrides, message in cases:
        with pytest.raises(UserError, match=re.escape(message)):
            evaluate(eval_config("benchmark=drawbench", f"output={tmp_path / 'out'}", "tracking=false", *overrides))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "evaluation.run",
            "benchmark=drawbench",
            f"pipeline={tmp_path}",
            f"hydra.run.dir={tmp_path / 'hydra'}",
        ],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        f"error: pipeline={tmp_path} is not a diffusers pipeline folder (no model_index.json there)"
    ]
