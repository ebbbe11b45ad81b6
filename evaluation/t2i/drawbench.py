"""`python -m evaluation.run benchmark=drawbench pipeline=<pipeline folder> prompts=<csv|drawbench|world>
[baseline=<pipeline folder>] [judge=<CLIP folder>]`

prompts → images (N per prompt with seeds seed … seed+N−1, the same for model and baseline; images already on
disk are kept) → scores (CLIPScore with a CLIP judge, which should not be the model's own text encoder: the
report says when it is, `evaluation.t2i.judge`; on the world suite also the ground-truth checkers) →
per-category means with bootstrap intervals, and win rates against the baseline → report (JSON, HTML, MLflow).
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from tqdm import tqdm

from evaluation.t2i.generate import draw, load_pipeline
from evaluation.t2i.judge import judge_folder, judge_independence
from evaluation.t2i.metrics import bootstrap_crossed_mean, bootstrap_mean, clip_scores, pairwise_outcomes
from evaluation.t2i.prompt_suites import Prompt, load_prompts, world_vocabulary
from evaluation.t2i.report import write_report
from evaluation.t2i.world_checks import CHECKS, ObjectFinder, judge
from training.clip.encode import ClipEncoder
from training.clip.model import load_clip
from training.errors import UserError

# What decides an image's pixels; a change to any of them draws new images into a new folder.
GENERATION_KEYS = ("n", "seed", "steps", "guidance_scale", "sampler", "height", "width", "negative_prompt")


def require_pipeline(path: str, option: str) -> None:
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise UserError(f"{option}={path} is not a diffusers pipeline folder (no model_index.json there)")


def image_folder(root: str, model: str, generation: dict) -> str:
    """`<root>/images/<model name>-<key>`: the key covers the model folder (path and export time) and every
    generation setting, so a rerun finds its images and a retrained model or new settings never reuse them."""
    stamp = os.stat(os.path.join(model, "model_index.json")).st_mtime_ns
    identity = {"model": os.path.abspath(model), "exported": stamp, **{k: generation.get(k) for k in GENERATION_KEYS}}
    key = hashlib.sha1(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return os.path.join(root, "images", f"{os.path.basename(os.path.abspath(model))}-{key}")


def image_file(text: str, seed: int) -> str:
    return f"{hashlib.sha1(text.encode()).hexdigest()[:12]}_{seed}.png"


def generate_images(
    model: str,
    prompts: list[Prompt],
    folder: str,
    generation: dict,
    batch_size: int,
    device: str | None,
    progress: bool = True,
) -> int:
    """Draw the images of `folder` that are missing; returns how many were drawn. Each image has its own
    generator, so an image is the same whatever batch it falls in."""
    os.makedirs(folder, exist_ok=True)
    seeds = range(int(generation["seed"]), int(generation["seed"]) + int(generation["n"]))
    texts = list(dict.fromkeys(p.text for p in prompts))
    missing = [(t, s) for t in texts for s in seeds if not os.path.exists(os.path.join(folder, image_file(t, s)))]
    if not missing:
        return 0
    pipeline = load_pipeline(model, generation.get("sampler"), device)
    limit = pipeline.tokenizer.model_max_length
    truncated = sum(len(pipeline.tokenizer(t, verbose=False).input_ids) > limit for t in texts)
    if truncated:  # said once here; the pipeline's own warning per batch is silenced in `draw`
        print(
            f"{truncated} of {len(texts)} prompts are longer than the text encoder's {limit} tokens: "
            f"the model sees them truncated"
        )
    batches = range(0, len(missing), batch_size)
    for start in tqdm(batches, desc=f"generate {os.path.basename(folder)}", unit="batch", disable=not progress):
        chunk = missing[start : start + batch_size]
        images = draw(
            pipeline,
            [t for t, _ in chunk],
            [s for _, s in chunk],
            generation["steps"],
            generation["guidance_scale"],
            generation.get("negative_prompt"),
            generation.get("height"),
            generation.get("width"),
        )
        for (text, seed), image in zip(chunk, images):
            path = os.path.join(folder, image_file(text, seed))
            image.save(path + ".tmp.png")
            os.replace(path + ".tmp.png", path)  # a killed run leaves no half-written image behind
    with open(os.path.join(folder, "generation.json"), "w") as f:
        json.dump({"model": os.path.abspath(model), **generation}, f, indent=2, default=str)
    return len(missing)


def score_images(
    prompts: list[Prompt],
    seeds: list[int],
    folder: str,
    encoder: ClipEncoder,
    finder: ObjectFinder | None,
    batch_size: int,
    progress: bool = True,
) -> list[dict]:
    """One row per (prompt, seed): the image's path, its CLIPScore and, with truth, the checks."""
    rows = [
        {"prompt": p.text, "category": p.category, "seed": s, "image": os.path.join(folder, image_file(p.text, s))}
        for p in prompts
        for s in seeds
    ]
    truths = [p.truth for p in prompts for _ in seeds]
    batches = range(0, len(rows), batch_size)
    for start in tqdm(batches, desc=f"score {os.path.basename(folder)}", unit="batch", disable=not progress):
        chunk = rows[start : start + batch_size]
        images = [Image.open(r["image"]).convert("RGB") for r in chunk]
        for row, value in zip(chunk, clip_scores(encoder, images, [r["prompt"] for r in chunk], batch_size)):
            row["clip_score"] = float(value)
        for row, image, truth in zip(chunk, images, truths[start : start + batch_size]):
            if finder is not None and truth is not None:
                row.update(judge(truth, finder(image)))
    return rows


def judge_empty_prompt(model, prompts, seeds, rows, folder, generation, batch_size, device, finder, progress=True):
    """`empty_prompt_correct` on each row: the model's image for the empty prompt with the row's seed, judged
    against the row's truth. What the model draws from the noise alone passes some checks by chance (a
    centred blob is "in the centre"); a model that follows its prompts must score clearly above this.
    `gain_over_empty`: the row's own result minus that, whose interval (`summarise`) says how clearly."""
    generate_images(model, [Prompt("", "empty prompt")], folder, generation, batch_size, device, progress)
    verdicts = {}
    for row, truth in zip(rows, [p.truth for p in prompts for _ in seeds]):
        if truth is None:
            continue
        if row["seed"] not in verdicts:
            image = Image.open(os.path.join(folder, image_file("", row["seed"]))).convert("RGB")
            verdicts[row["seed"]] = finder(image)
        row["empty_prompt_correct"] = float(judge(truth, verdicts[row["seed"]])["correct"])
        # Paired by prompt and seed (the same noise, with and without the text): what the text adds.
        row["gain_over_empty"] = float(row["correct"]) - row["empty_prompt_correct"]


def _per_prompt_and_seed(rows: list[dict], key: str) -> np.ndarray:
    """(prompts, seeds): the mean of `key` over each prompt's rows of each seed (rows with the key only), NaN
    where there is none; prompts in order, seeds sorted."""
    chosen = [r for r in rows if r.get(key) is not None]
    prompts = {p: i for i, p in enumerate(dict.fromkeys(r["prompt"] for r in chosen))}
    seeds = {s: j for j, s in enumerate(sorted({r["seed"] for r in chosen}))}
    total, count = np.zeros((len(prompts), len(seeds))), np.zeros((len(prompts), len(seeds)))
    for row in chosen:
        cell = prompts[row["prompt"]], seeds[row["seed"]]
        total[cell] += float(row[key])
        count[cell] += 1
    return np.divide(total, count, out=np.full_like(total, np.nan), where=count > 0)


def _per_prompt(rows: list[dict], key: str) -> np.ndarray:
    """Mean of `key` over each prompt's images (rows with the key only), in prompt order."""
    grid = _per_prompt_and_seed(rows, key)
    return np.nanmean(grid, axis=1) if grid.size else np.zeros(0)


# Scores read off the empty prompt's images, one per seed shared by every prompt: their intervals resample
# seeds as well as prompts.
SHARED_SEED_KEYS = ("empty_prompt_correct", "gain_over_empty")


def summarise(rows: list[dict], baseline_rows: list[dict] | None, resamples: int, confidence: float) -> dict:
    """Per category (in the suite's order) and over all prompts: CLIPScore, the checks, and win rates."""
    categories = list(dict.fromkeys(r["category"] for r in rows))
    if baseline_rows is not None:
        for key in ("clip_score", "correct"):
            if key not in rows[0]:
                continue
            wins = pairwise_outcomes([r[key] for r in rows], [o[key] for o in baseline_rows])
            for row, other, win in zip(rows, baseline_rows, wins):
                row[f"baseline_{key}"], row["win" if key == "clip_score" else "win_correct"] = other[key], float(win)
        for row, other in zip(rows, baseline_rows):
            row["baseline_image"] = other["image"]
    summary = {}
    for category in [*categories, "all"]:
        chosen = [r for r in rows if category in ("all", r["category"])]
        entry = {"prompts": len({r["prompt"] for r in chosen}), "images": len(chosen)}
        for key in (
            "clip_score",
            "correct",
            "empty_prompt_correct",
            "gain_over_empty",
            *CHECKS,
            "baseline_clip_score",
            "baseline_correct",
            "win",
            "win_correct",
        ):
            if not any(r.get(key) is not None for r in chosen):
                continue
            if key in SHARED_SEED_KEYS:
                entry[key] = bootstrap_crossed_mean(_per_prompt_and_seed(chosen, key), resamples, confidence)
            else:
                entry[key] = bootstrap_mean(_per_prompt(chosen, key), resamples, confidence)
        summary[category] = entry
    return summary


def flat_metrics(summary: dict) -> dict[str, float]:
    """`clip_score/Colors`, `clip_score/Colors/low`, `win/all`, … for MLflow and the JSON."""
    metrics = {}
    for category, entry in summary.items():
        for key, value in entry.items():
            if isinstance(value, dict):
                metrics[f"{key}/{category}"] = value["mean"]
                metrics[f"{key}/{category}/low"] = value["low"]
                metrics[f"{key}/{category}/high"] = value["high"]
    return metrics


def evaluate_drawbench(cfg: DictConfig) -> dict:
    model, baseline = str(cfg.pipeline), (str(cfg.baseline) if cfg.baseline else None)
    require_pipeline(model, "pipeline")
    if baseline:
        require_pipeline(baseline, "baseline")
    judge_path = judge_folder(model, cfg.judge)
    independence = judge_independence(model, judge_path, given=bool(cfg.judge))
    if not independence["independent"]:
        print(f"warning: {independence['note']}")  # now, before the images are drawn, and again in the report
    suite, prompts = load_prompts(
        str(cfg.prompts), int(cfg.world_suite.per_category), int(cfg.world_suite.seed), cfg.world_suite.world
    )
    generation = OmegaConf.to_container(cfg.generation, resolve=True)
    if int(generation["n"]) < 1:
        raise UserError(f"generation.n={generation['n']}; expected at least one image per prompt")
    output = str(cfg.output or os.path.join("eval_results", f"drawbench_{suite}"))
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    batch_size = int(generation.pop("batch_size"))
    seeds = list(range(int(generation["seed"]), int(generation["seed"]) + int(generation["n"])))

    folders = {"model": image_folder(output, model, generation)}
    if baseline:
        folders["baseline"] = image_folder(output, baseline, generation)
    progress = bool(cfg.get("progress", True))
    drawn = {
        role: generate_images(path, prompts, folders[role], generation, batch_size, device, progress)
        for role, path in (("model", model), ("baseline", baseline))
        if path
    }

    encoder = ClipEncoder.from_bundle(load_clip(judge_path), device)
    has_truth = any(p.truth for p in prompts)
    finder = ObjectFinder(world_vocabulary(cfg.world_suite.world)["colours"], **cfg.checker) if has_truth else None
    rows = score_images(prompts, seeds, folders["model"], encoder, finder, int(cfg.batch_size), progress)
    baseline_rows = (
        score_images(prompts, seeds, folders["baseline"], encoder, finder, int(cfg.batch_size), progress)
        if baseline
        else None
    )
    if cfg.get("empty_prompt_reference") and finder is not None:
        judge_empty_prompt(
            model, prompts, seeds, rows, folders["model"], generation, batch_size, device, finder, progress
        )
    summary = summarise(rows, baseline_rows, int(cfg.report.bootstrap), float(cfg.report.confidence))
    record = {
        "dataset": suite,
        "model": model,
        "baseline": baseline,
        "judge": judge_path,
        "judge_independent": independence["independent"],
        "judge_note": independence["note"],
        "task": "drawbench",
        "generation": generation,
        "samples": len(rows),
        "generated": drawn,
        "metrics": flat_metrics(summary),
        "categories": summary,
        "rows": rows,
    }
    write_report(record, output, OmegaConf.to_container(cfg, resolve=True), cfg.report, bool(cfg.tracking))
    return record
