"""Zero-shot classification and retrieval of a CLIP folder on a clip_benchmark-layout eval set
(`benchmark=zeroshot|retrieval` of `python -m evaluation.run`)."""

from __future__ import annotations

import json
import os

import torch
from omegaconf import DictConfig, OmegaConf

from evaluation.report import confusion_figure, log_evaluation, model_tags, per_class_table, print_summary
from evaluation.zeroshot.benchmark import retrieval, zeroshot_classification
from evaluation.zeroshot.datasets import EvalSet
from evaluation.zeroshot.templates import resolve_templates
from training.clip.encode import ClipEncoder
from training.clip.model import load_clip, require_clip_folder


def lineage(model: str, eval_set: EvalSet) -> dict:
    """Tags that say which model and data the numbers belong to."""
    tags = {**model_tags(model), "pixelmill.dataset": os.path.abspath(eval_set.path)}
    manifest = os.path.join(eval_set.path, "manifest.json")
    if os.path.exists(manifest):
        tags["pixelmill.dataset_hash"] = json.load(open(manifest)).get("content_hash", "")
    return tags


def evaluate_clip(cfg: DictConfig) -> dict:
    """Zero-shot classification (`task: zeroshot`) or retrieval of `clip` on `dataset`; returns the JSON
    record (also written to `output`)."""
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    classify = cfg.task == "zeroshot"
    require_clip_folder(str(cfg.clip), "clip")  # both checked before the model is loaded: bad input fails in a second
    eval_set = EvalSet.open(str(cfg.dataset), cfg.split, need_classnames=classify and not cfg.classnames)
    encoder = ClipEncoder.from_bundle(load_clip(str(cfg.clip)), device)
    tables, figures = {}, {}
    if classify:
        classnames = list(cfg.classnames) if cfg.classnames else eval_set.classnames
        templates = resolve_templates(
            OmegaConf.to_object(cfg.templates) if OmegaConf.is_config(cfg.templates) else cfg.templates, eval_set.path
        )
        result = zeroshot_classification(
            encoder, eval_set, classnames, templates, cfg.batch_size, cfg.num_workers, cfg.progress
        )
        tables["per_class.json"] = per_class_table(classnames, result)
        figures["confusion_matrix.png"] = confusion_figure(classnames, result["confusion"])
        extra = {"templates": len(templates), "classes": len(classnames)}
    else:
        result = retrieval(encoder, eval_set, cfg.batch_size, cfg.num_workers, cfg.chunk_size, cfg.progress)
        extra = {"captions": result["captions"]}
    record = {
        "dataset": eval_set.name,
        "model": str(cfg.clip),
        "task": cfg.task,
        "metrics": result["metrics"],
        "samples": result["samples"],
        **extra,
    }
    output = cfg.output or os.path.join("eval_results", f"{eval_set.name}_{cfg.task}.json")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
        json.dump(record, f, indent=2)
    if cfg.tracking:
        log_evaluation(
            record, OmegaConf.to_container(cfg, resolve=True), tables, figures, lineage(str(cfg.clip), eval_set), output
        )
    print_summary(record, output)
    return record
