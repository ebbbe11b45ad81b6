"""Where `train(cfg)` runs, chosen by `conf/launcher/*.yaml`'s `_target_`:
- `LocalLauncher` (default): this process, and the processes Lightning starts for trainer=ddp|fsdp.
- `RayLauncher`: `python -m training.train … launcher=ray launcher.num_workers=4 [launcher.use_gpu=true]`.

Ray's `TorchTrainer` starts `num_workers` processes on the cluster (RAY_ADDRESS, or a local Ray) and each runs
the same `train(cfg)` as a plain launch, with one change: Lightning takes its process group and ranks from
Ray (`RayDDPStrategy`, `RayLightningEnvironment`) instead of spawning processes itself. Outputs, checkpoints
and MLflow runs are the same as a local launch; `output` must be a path every worker can reach (a shared
filesystem on a multi-node cluster).
"""

from __future__ import annotations

import math
import os

from omegaconf import DictConfig, OmegaConf

from training.errors import UserError
from training.train import train

RAY_STRATEGY = {"_target_": "ray.train.lightning.RayDDPStrategy"}
RAY_ENVIRONMENT = [{"_target_": "ray.train.lightning.RayLightningEnvironment"}]


def worker_config(cfg: dict) -> DictConfig:
    """The config a Ray Train worker trains with: the user's, with Ray's strategy and environment."""
    worker = OmegaConf.create(cfg)
    use_gpu = bool(worker.launcher.use_gpu)
    worker.trainer.strategy = RAY_STRATEGY
    worker.trainer.plugins = RAY_ENVIRONMENT
    worker.trainer.accelerator = "gpu" if use_gpu else "cpu"
    worker.trainer.devices = "auto"  # one device per worker: Ray assigns it
    return worker


def _train_worker(config: dict) -> None:
    """What each Ray Train worker runs."""
    import ray.train
    from ray.train.lightning import prepare_trainer

    metric = train(worker_config(config["cfg"]), prepare=prepare_trainer)
    ray.train.report({"metric": float(metric)})


class LocalLauncher:
    """`train(cfg)` in this process."""

    def __call__(self, cfg: DictConfig) -> float:
        return train(cfg)


class RayLauncher:
    """`train(cfg)` on `num_workers` Ray Train workers; returns the metric rank 0 reports."""

    def __init__(self, num_workers: int = 2, use_gpu: bool = False, cpus_per_worker: float = 1):
        self.num_workers, self.use_gpu, self.cpus_per_worker = int(num_workers), bool(use_gpu), float(cpus_per_worker)

    def __call__(self, cfg: DictConfig) -> float:
        import ray
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        strategy = cfg.trainer.get("strategy")
        if strategy not in (None, "auto", "ddp"):
            name = strategy.get("_target_") if hasattr(strategy, "get") else strategy
            raise UserError(
                f"launcher=ray runs data-parallel (DDP) workers; trainer.strategy={name} is not supported "
                f"under it (use trainer=cpu or trainer=gpu as the base)"
            )
        workers = self.num_workers
        if workers < 1:
            raise UserError(f"launcher.num_workers={workers}; expected at least 1")
        if not ray.is_initialized():
            ray.init()  # RAY_ADDRESS (set for `ray job submit` jobs) joins the cluster; else a local Ray
        output = os.path.abspath(str(cfg.output))
        os.makedirs(output, exist_ok=True)
        resources = {"CPU": self.cpus_per_worker}
        trainer = TorchTrainer(
            _train_worker,
            train_loop_config={"cfg": OmegaConf.to_container(cfg, resolve=True)},
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=self.use_gpu, resources_per_worker=resources),
            run_config=RunConfig(
                name=f"{cfg.task_name}-{os.path.basename(output)}", storage_path=os.path.join(output, "ray_train")
            ),
        )
        result = trainer.fit()
        metric = (result.metrics or {}).get("metric", math.nan)
        print(f"Ray Train: {workers} worker(s) finished; metric {metric:.4f}")
        return metric
