"""`python -m training.train task=clip|vae|ldm data.path=<shards> output=<dir> [trainer=cpu|ddp|fsdp|gpu] [any option]`
(`launcher=ray launcher.num_workers=N`: the same training on N Ray Train workers, see `training/launchers.py`)

`train(cfg)` reads as a checklist: data → the task's recipe (model, module, export) → callbacks → logger →
trainer → fit.
The same command resumes: with `<output>/checkpoints/last.ckpt` present, training continues from there
(model, optimizer, schedule, data position), logging into the same MLflow run.
"""

from __future__ import annotations

import json
import os
import time

import hydra
from omegaconf import DictConfig, OmegaConf

from training.command_line import hydra_entry
from training.errors import run_command
from training.tracking import data_lineage, experiment_name, flatten, sweep_parent_run

# torch, Lightning and the models are imported inside train(): a command that cannot start (a tracking
# server that is down, a bad option) says so in a second, not after ten seconds of imports.

LAST_CHECKPOINT = "checkpoints/last.ckpt"


def mlflow_logger(cfg: DictConfig, output: str):
    """MLflow through a journaled run (training/tracking): a server that goes away never stalls a step. A
    resumed run logs into the run it started, and a job of a Hydra multirun is a child of the sweep's run."""
    from pytorch_lightning.utilities import rank_zero_only

    from training.tracking.journaled import TrackedRun
    from training.tracking.lightning import TrackedRunLogger

    experiment, name = experiment_name(cfg.task_name), f"{cfg.task_name} {os.path.basename(os.path.abspath(output))}"
    if rank_zero_only.rank != 0:
        return TrackedRunLogger(None, experiment)
    run_file = os.path.join(output, "mlflow_run.json")
    previous = json.load(open(run_file))["run_id"] if os.path.exists(run_file) else None
    if previous is not None:
        return TrackedRunLogger(TrackedRun.start(name, output, experiment, run_id=previous), experiment)
    tags = {"pixelmill.task": cfg.task_name, "pixelmill.output": os.path.abspath(output)}
    manifest = os.path.join(str(cfg.data.path), "manifest.json")
    if os.path.exists(manifest):
        tags["pixelmill.data_hash"] = json.load(open(manifest)).get("content_hash", "")
    tags["pixelmill.data_path"] = str(cfg.data.path)
    if parent := sweep_parent_run(cfg.task_name):
        tags["mlflow.parentRunId"] = parent
    run = TrackedRun.start(name, output, experiment, tags)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    run.log_params(flatten(resolved))
    run.log_dict(resolved, "config.json")
    for stage, entry in data_lineage(str(cfg.data.path)).items():  # shards ← filter ← annotate ← crawl
        run.set_tag(f"pixelmill.lineage.{stage}", entry["path"])
        run.log_dict(entry["manifest"], f"lineage/{stage}_manifest.json")
    if run.run_id:  # None only when the server went away between the start-up probe and here
        with open(run_file, "w") as f:
            json.dump({"run_id": run.run_id}, f)
    return TrackedRunLogger(run, experiment)


def share_cpu_threads(trainer) -> None:
    """Local CPU ranks share the machine's cores: by torch's default each process takes every core, so N ranks
    would run N threads per core. Each gets cores // N, as torchrun limits its ranks; an OMP_NUM_THREADS the
    user set wins (Ray Train sets it per worker)."""
    import torch
    from pytorch_lightning.accelerators import CPUAccelerator

    ranks = int(trainer.num_devices)
    if "OMP_NUM_THREADS" not in os.environ and ranks > 1 and isinstance(trainer.accelerator, CPUAccelerator):
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // ranks))


def train(cfg: DictConfig, prepare=None) -> float:
    """Train, export, and return the metric a sweep compares (validation loss, else training loss).
    `prepare(trainer)` adapts the Lightning trainer to a launcher (Ray Train's `prepare_trainer`)."""
    import pytorch_lightning as pl
    from hydra.utils import instantiate
    from pytorch_lightning.callbacks import ThroughputMonitor
    from pytorch_lightning.plugins.io import TorchCheckpointIO

    from training.callbacks import SeedPerRank, checkpointing
    from training.checkpoint_io import AtomicCheckpointIO

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
    share_cpu_threads(trainer)
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # a user's own CheckpointIO plugin stays
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()  # last.ckpt whole or the previous one, disk full or not

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
    from hydra.utils import instantiate

    # conf/launcher: this process (default) or Ray Train workers
    return run_command(lambda c: instantiate(c.launcher)(c), cfg)


if __name__ == "__main__":
    hydra_entry(main)
