"""`python -m training.train task=clip|vae|ldm data.path=<shards> output=<dir> [trainer=cpu|ddp|fsdp|gpu] [any option]`
(`launcher=ray launcher.num_workers=N`: the same training on N Ray Train workers, see `training/launchers.py`)

`train(cfg)` reads as a checklist: data → the task's recipe (model, module, export) → callbacks → logger →
trainer → fit.
The same command resumes: with `<output>/checkpoints/last.ckpt` present, training continues from there
(model, optimizer, schedule, data position), logging into the same MLflow run.
"""

from __future__ import annotations

import datetime
import json
import os
import time

import hydra
import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint, ThroughputMonitor
from pytorch_lightning.utilities import rank_zero_only

from training.errors import run_command
from training.tracking import data_lineage, experiment_name, flatten, sweep_parent_run, tracking_uri

LAST_CHECKPOINT = "checkpoints/last.ckpt"


def mlflow_logger(cfg: DictConfig, output: str):
    """MLflow through Lightning's logger; a resumed run logs into the run it started, and a job of a Hydra
    multirun is a child of the sweep's run."""
    from pytorch_lightning.loggers import MLFlowLogger

    run_file = os.path.join(output, "mlflow_run.json")
    previous = json.load(open(run_file))["run_id"] if os.path.exists(run_file) else None
    tags = {"pixelmill.task": cfg.task_name, "pixelmill.output": os.path.abspath(output)}
    manifest = os.path.join(str(cfg.data.path), "manifest.json")
    if os.path.exists(manifest):
        tags["pixelmill.data_hash"] = json.load(open(manifest)).get("content_hash", "")
    tags["pixelmill.data_path"] = str(cfg.data.path)
    if previous is None and rank_zero_only.rank == 0:
        parent = sweep_parent_run(cfg.task_name)
        if parent:
            tags["mlflow.parentRunId"] = parent
    logger = MLFlowLogger(
        experiment_name=experiment_name(cfg.task_name),
        run_name=f"{cfg.task_name} {os.path.basename(os.path.abspath(output))}",
        tracking_uri=tracking_uri(),
        tags=tags,
        run_id=previous,
    )
    if rank_zero_only.rank == 0:
        resolved = OmegaConf.to_container(cfg, resolve=True)
        if previous is None:
            logger.log_hyperparams(flatten(resolved))
            logger.experiment.log_dict(logger.run_id, resolved, "config.json")
            for stage, entry in data_lineage(str(cfg.data.path)).items():  # shards ← filter ← annotate ← crawl
                logger.experiment.set_tag(logger.run_id, f"pixelmill.lineage.{stage}", entry["path"])
                logger.experiment.log_dict(logger.run_id, entry["manifest"], f"lineage/{stage}_manifest.json")
            with open(run_file, "w") as f:
                json.dump({"run_id": logger.run_id}, f)
    return logger


def checkpointing(cfg: DictConfig, output: str) -> ModelCheckpoint:
    """`checkpoints/last.ckpt` (what a rerun resumes from) every `checkpoint_every` steps, or every
    `checkpoint_every_minutes` of wall clock when set (long steps, preemptible machines); with
    `checkpoint_keep=k`, also the last k as `step<N>.ckpt`."""
    minutes = cfg.get("checkpoint_every_minutes")
    keep = int(cfg.get("checkpoint_keep") or 0)
    return ModelCheckpoint(
        dirpath=os.path.join(output, "checkpoints"),
        every_n_train_steps=None if minutes else int(cfg.checkpoint_every),
        train_time_interval=datetime.timedelta(minutes=float(minutes)) if minutes else None,
        save_last=True,
        save_top_k=keep,
        monitor="step" if keep else None,  # the highest steps are the last ones
        mode="max",
        filename="step{step:08d}",
        auto_insert_metric_name=False,
    )


class SeedPerRank(pl.Callback):
    """Every rank builds the model from `seed` (identical weights), then draws from `seed + global rank` (as
    open_clip does): otherwise W ranks draw the same noise, timesteps, dropout masks and posterior samples,
    and W GPUs train on one GPU's worth of them. Augmentation is keyed by sample, so it does not depend on this."""

    def __init__(self, seed: int):
        self.seed = int(seed)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl.seed_everything(self.seed + trainer.global_rank, workers=True, verbose=False)


def train(cfg: DictConfig, prepare=None) -> float:
    """Train, export, and return the metric a sweep compares (validation loss, else training loss).
    `prepare(trainer)` adapts the Lightning trainer to a launcher (Ray Train's `prepare_trainer`)."""
    output = str(cfg.output)
    os.makedirs(output, exist_ok=True)
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)

    datamodule = instantiate(cfg.data)
    recipe = instantiate(cfg.recipe)(cfg, datamodule, output)  # the task's own: training/<family>/recipe.py
    module = recipe.module
    callbacks = [
        checkpointing(cfg, output),
        SeedPerRank(int(cfg.seed)),
        *recipe.callbacks,
        ThroughputMonitor(
            batch_size_fn=lambda batch: len(batch["keys"]), window_size=int(cfg.throughput_window), separator="/"
        ),
        *(instantiate(c) for c in (cfg.get("callbacks") or {}).values()),  # e.g. zero-shot eval (evaluation/)
    ]
    logger = mlflow_logger(cfg, output) if cfg.tracking else False
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger, default_root_dir=output)
    if prepare is not None:
        trainer = prepare(trainer)

    last = os.path.join(output, LAST_CHECKPOINT)
    resume = last if os.path.exists(last) else None
    started = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume)
    seconds = time.perf_counter() - started

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if trainer.is_global_zero:
        steps = trainer.global_step - module.start_step
        samples = steps * datamodule.batch_size * trainer.world_size * trainer.accumulate_grad_batches
        print(
            f"\ntrained {cfg.task_name}: step {trainer.global_step}{' (resumed)' if resume else ''}, "
            f"{trainer.world_size} process(es), {seconds:.1f} s"
        )
        for name in recipe.summary:
            if name in metrics:
                print(f"  {name:<24} {metrics[name]:.4f}")
        print(f"  {'samples/s (incl. start)':<24} {samples / max(seconds, 1e-9):.1f}")
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        print(f"  {'parameters (trainable)':<24} {sum(p.numel() for p in module.parameters()):,} ({trainable:,})")
        print(f"  export: {recipe.export}")
    return metrics.get("val/loss", metrics.get("train/loss", float("nan")))


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    launcher = instantiate(cfg.launcher)  # conf/launcher: this process (default) or Ray Train workers
    return run_command(launcher, cfg)


if __name__ == "__main__":
    main()
