"""`python -m evaluation.run task=zeroshot|retrieval model=<CLIP folder> dataset=<clip_benchmark-layout dir>`
`python -m evaluation.run task=drawbench model=<pipeline folder> prompts=<csv|drawbench|world> [baseline=…]`
(text-to-image: see `evaluation/drawbench.py`)

Results go to a JSON file in clip_benchmark's shape (`dataset`, `model`, `task`, `metrics`) and to MLflow
(experiment `pixelmill-<task>` unless MLFLOW_EXPERIMENT_NAME is set): metrics, the per-class table, the
confusion matrix, and tags tying the numbers to the model (its folder, its training run) and the data.
"""

from __future__ import annotations

import json
import os

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from evaluation.datasets import EvalSet
from evaluation.report import confusion_figure, log_evaluation, model_tags, per_class_table, print_summary
from evaluation.templates import resolve_templates
from evaluation.zeroshot import ClipEncoder, retrieval, zeroshot_classification
from training.clip_model import load_clip, require_clip_folder
from training.errors import UserError, run_command

TASKS = ("zeroshot", "retrieval", "drawbench")


def lineage(model: str, eval_set: EvalSet) -> dict:
    """Tags that say which model and data the numbers belong to."""
    tags = {**model_tags(model), "pixelmill.dataset": os.path.abspath(eval_set.path)}
    manifest = os.path.join(eval_set.path, "manifest.json")
    if os.path.exists(manifest):
        tags["pixelmill.dataset_hash"] = json.load(open(manifest)).get("content_hash", "")
    return tags


def evaluate(cfg: DictConfig) -> dict:
    """Run one task on one dataset; returns the JSON record (also written to `output`)."""
    if cfg.task not in TASKS:
        raise UserError(f"task={cfg.task} is not one of {', '.join(TASKS)}")
    if cfg.task == "drawbench":
        from evaluation.drawbench import evaluate_drawbench  # diffusers is loaded only for this task

        return evaluate_drawbench(cfg)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    classify = cfg.task == "zeroshot"
    require_clip_folder(str(cfg.model))  # both checked before the model is loaded: bad input fails in a second
    eval_set = EvalSet.open(str(cfg.dataset), cfg.split, need_classnames=classify and not cfg.classnames)
    encoder = ClipEncoder.from_bundle(load_clip(str(cfg.model)), device)
    tables, figures = {}, {}
    if classify:
        classnames = list(cfg.classnames) if cfg.classnames else eval_set.classnames
        templates = resolve_templates(OmegaConf.to_object(cfg.templates) if OmegaConf.is_config(cfg.templates) else cfg.templates,
                                      eval_set.path)
        result = zeroshot_classification(encoder, eval_set, classnames, templates, cfg.batch_size, cfg.num_workers, cfg.progress)
        tables["per_class.json"] = per_class_table(classnames, result)
        figures["confusion_matrix.png"] = confusion_figure(classnames, result["confusion"])
        extra = {"templates": len(templates), "classes": len(classnames)}
    else:
        result = retrieval(encoder, eval_set, cfg.batch_size, cfg.num_workers, cfg.chunk_size, cfg.progress)
        extra = {"captions": result["captions"]}
    record = {"dataset": eval_set.name, "model": str(cfg.model), "task": cfg.task, "metrics": result["metrics"],
              "samples": result["samples"], **extra}
    output = cfg.output or os.path.join("eval_results", f"{eval_set.name}_{cfg.task}.json")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
        json.dump(record, f, indent=2)
    if cfg.tracking:
        log_evaluation(record, OmegaConf.to_container(cfg, resolve=True), tables, figures, lineage(str(cfg.model), eval_set))
    print_summary(record, output)
    return record


# Its own config folder: `model` and `task` are config groups of conf/ (training), plain values here.
@hydra.main(version_base="1.3", config_path="../conf/evaluation", config_name="eval")
def main(cfg: DictConfig) -> float:
    record = run_command(evaluate, cfg)
    metrics = record["metrics"]
    return metrics.get("acc1", metrics.get("image_retrieval_recall@1", metrics.get("clip_score/all", 0.0)))


if __name__ == "__main__":
    main()
