"""Where `train(cfg)` runs, chosen by `conf/launcher/*.yaml`'s `_target_`:
- `LocalLauncher` (default): this process, and the processes Lightning starts for trainer=ddp|fsdp.
- `RayLauncher`: `python -m training.train … launcher=ray launcher.num_workers=4 [launcher.use_gpu=true]
  [trainer=fsdp]`.

Ray's `TorchTrainer` starts `num_workers` processes on the cluster (RAY_ADDRESS, or a local Ray) and each runs
the same `train(cfg)` as a plain launch, with one change: Lightning takes its process group and ranks from
Ray (`RayLightningEnvironment`) instead of spawning processes itself. The strategy is DDP (`RayDDPStrategy`)
or, for trainer=fsdp, FSDP2 (`RayModelParallelStrategy`: Lightning's ModelParallelStrategy, so the modules
shard each block with `fully_shard` in `configure_model` exactly as in a local run). Outputs, checkpoints
(a distributed-checkpoint folder `last.ckpt/` under FSDP2), exports and MLflow runs are the same as a local
launch; `output` must be a path every worker can reach (a shared filesystem on a multi-node cluster).

A worker that dies (killed, out of memory, its node lost) does not end the run: Ray Train stops the others and
starts them all again, up to `max_failures` times (`FailureConfig`), and each resumes from
`<output>/checkpoints/last.ckpt` as a rerun of the command would. Rank 0 notes every start in
`<output>/ray_train/starts.jsonl`, so the launcher's summary says how often that happened and from which step.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid

import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.strategies import ModelParallelStrategy

from training.errors import UserError
from training.tracking import tracking_uri
from training.train import LAST_CHECKPOINT, train

RAY_DDP = {"_target_": "ray.train.lightning.RayDDPStrategy"}
RAY_FSDP = "training.launchers.RayModelParallelStrategy"
RAY_ENVIRONMENT = [{"_target_": "ray.train.lightning.RayLightningEnvironment"}]
# What trainer=fsdp (and a user's own spelling of it) names; FSDP1 (`strategy=fsdp`) stays refused.
MODEL_PARALLEL = {
    "pytorch_lightning.strategies.ModelParallelStrategy",
    "pytorch_lightning.strategies.model_parallel.ModelParallelStrategy",
    "lightning.pytorch.strategies.ModelParallelStrategy",
    RAY_FSDP,
}


class RayModelParallelStrategy(ModelParallelStrategy):
    """FSDP2 in a Ray Train worker. Ray has already joined the workers in one process group (gloo on CPU,
    NCCL on GPU) and Lightning's `_init_dist_connection` returns early when one exists, so Lightning builds
    its device mesh over Ray's group, with ranks and world size from `RayLightningEnvironment`. Only the
    device needs Ray: Lightning takes `parallel_devices[local_rank]`, but a worker sees its one device
    (devices=auto) while its local rank counts every worker on the node, so this asks Ray, as
    `RayDDPStrategy` does. (`process_group_backend` and `timeout` have no effect here: Ray's TorchConfig
    sets them.)"""

    @property
    def root_device(self) -> torch.device:
        import ray.train.torch

        return ray.train.torch.get_device()


def strategy_kind(strategy) -> str:
    """'ddp' or 'fsdp', what launcher=ray runs for `trainer.strategy`; a UserError for anything else."""
    if strategy in (None, "auto", "ddp"):
        return "ddp"
    config = hasattr(strategy, "get")  # a `_target_` mapping; else one of Lightning's registry names
    name = strategy.get("_target_") if config else strategy
    if config and name in MODEL_PARALLEL:
        if strategy.get("tensor_parallel_size", 1) not in (1, "auto"):
            raise UserError(
                f"launcher=ray shards with FSDP2 over all workers; trainer.strategy.tensor_parallel_size="
                f"{strategy.get('tensor_parallel_size')} is not supported under it (use 1)"
            )
        return "fsdp"
    raise UserError(
        f"launcher=ray runs DDP (trainer=cpu|gpu|ddp) or FSDP2 (trainer=fsdp) workers; trainer.strategy={name} "
        f"is not supported under it"
    )


def worker_config(cfg: dict) -> DictConfig:
    """The config a Ray Train worker trains with: the user's, with Ray's strategy and environment."""
    worker = OmegaConf.create(cfg)
    use_gpu = bool(worker.launcher.use_gpu)
    if strategy_kind(worker.trainer.get("strategy")) == "fsdp":
        # The user's options (save_distributed_checkpoint, …) stay; the mesh is every worker: locally its size
        # is trainer.devices, which under Ray is one per worker.
        strategy = OmegaConf.to_container(worker.trainer.strategy)
        strategy.update(_target_=RAY_FSDP, data_parallel_size=int(worker.launcher.num_workers), tensor_parallel_size=1)
        worker.trainer.strategy = strategy
    else:
        worker.trainer.strategy = RAY_DDP
    worker.trainer.plugins = RAY_ENVIRONMENT
    worker.trainer.accelerator = "gpu" if use_gpu else "cpu"
    worker.trainer.devices = "auto"  # one device per worker: Ray assigns it
    return worker


def prepare(trainer):
    """Ray's `prepare_trainer`, which accepts only Ray's own strategy classes (DDP, FSDP1, DeepSpeed); for
    FSDP2 the same check it makes, that the ranks come from Ray."""
    from ray.train.lightning import RayLightningEnvironment, prepare_trainer

    if not isinstance(trainer.strategy, RayModelParallelStrategy):
        return prepare_trainer(trainer)
    if not isinstance(trainer.strategy.cluster_environment, RayLightningEnvironment):
        raise RuntimeError(f"expected RayLightningEnvironment, got {type(trainer.strategy.cluster_environment)}")
    return trainer


def _open_tracking_store(cfg: DictConfig) -> None:
    """train() opens the MLflow store on every worker at once (a local launch starts its other ranks only
    later, in `fit`); on a fresh sqlite file they race to create its tables ("table … already exists"). So
    rank 0 opens it first, over the process group Ray has already set up."""
    import torch.distributed as dist

    if not cfg.tracking or not dist.is_initialized():
        return
    if dist.get_rank() == 0:
        from mlflow import MlflowClient

        MlflowClient(tracking_uri())  # creates the store's tables if there are none
    dist.barrier()


def _train_worker(config: dict) -> float:
    """What each Ray Train worker runs."""
    import ray.train

    cfg = worker_config(config["cfg"])
    if ray.train.get_context().get_world_rank() == 0:
        _note_start(str(cfg.output), config["fit"])
    _open_tracking_store(cfg)
    metric = train(cfg, prepare=prepare)
    ray.train.report({"metric": float(metric)})
    return float(metric)  # rank 0's is the Result's `return_value` (Ray Train v2 keeps no metrics without a checkpoint)


class LocalLauncher:
    """`train(cfg)` in this process."""

    def __call__(self, cfg: DictConfig) -> float:
        return train(cfg)


STARTS = "ray_train/starts.jsonl"


def checkpoint_step(path: str) -> int | None:
    """The global step a Lightning checkpoint holds (a file, or FSDP2's distributed-checkpoint folder with its
    `meta.pt`), None when there is none. Memory-mapped: the weights are not read."""
    if os.path.isdir(path):
        path = os.path.join(path, "meta.pt")
    if not os.path.exists(path):
        return None
    return int(torch.load(path, map_location="cpu", mmap=True, weights_only=False)["global_step"])


def _note_start(output: str, fit: str) -> None:
    """One line per start of the workers of fit `fit`: the first, and each restart after a worker died."""
    step = checkpoint_step(os.path.join(output, LAST_CHECKPOINT))
    os.makedirs(os.path.dirname(os.path.join(output, STARTS)), exist_ok=True)
    with open(os.path.join(output, STARTS), "a") as f:
        f.write(json.dumps({"fit": fit, "from_step": step, "time": time.time()}) + "\n")


def restarts(output: str, fit: str) -> list[int | None]:
    """The step each restart of fit `fit` resumed from (None: from the start, no checkpoint yet)."""
    path = os.path.join(output, STARTS)
    if not os.path.exists(path):
        return []
    starts = [json.loads(line) for line in open(path) if line.strip()]
    return [s["from_step"] for s in starts if s["fit"] == fit][1:]


def restarts_line(steps: list[int | None]) -> str:
    """What the summary says about restarts ("" when there were none)."""
    if not steps:
        return ""
    resumed = ", ".join("the start" if s is None else f"step {s}" for s in steps)
    return f"; restarted {len(steps)} time(s) after a worker died, resumed from {resumed}"


class RayLauncher:
    """`train(cfg)` on `num_workers` Ray Train workers; returns the metric rank 0 reports. Up to `max_failures`
    times, a worker's death restarts the workers from the last checkpoint."""

    def __init__(self, num_workers: int = 2, use_gpu: bool = False, cpus_per_worker: float = 1, max_failures: int = 2):
        self.num_workers, self.use_gpu, self.cpus_per_worker = int(num_workers), bool(use_gpu), float(cpus_per_worker)
        self.max_failures = int(max_failures)

    def __call__(self, cfg: DictConfig) -> float:
        import ray
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        kind = strategy_kind(cfg.trainer.get("strategy"))
        workers = self.num_workers
        if workers < 1:
            raise UserError(f"launcher.num_workers={workers}; expected at least 1")
        if self.max_failures < -1:
            raise UserError(f"launcher.max_failures={self.max_failures}; expected -1 (no limit), 0 or more")
        if not ray.is_initialized():
            ray.init()  # RAY_ADDRESS (set for `ray job submit` jobs) joins the cluster; else a local Ray
        output = os.path.abspath(str(cfg.output))
        os.makedirs(output, exist_ok=True)
        resources = {"CPU": self.cpus_per_worker}
        fit = uuid.uuid4().hex  # names this fit's lines in STARTS: a rerun of the command is not a restart
        trainer = TorchTrainer(
            _train_worker,
            train_loop_config={"cfg": OmegaConf.to_container(cfg, resolve=True), "fit": fit},
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=self.use_gpu, resources_per_worker=resources),
            run_config=RunConfig(
                name=f"{cfg.task_name}-{os.path.basename(output)}",
                storage_path=os.path.join(output, "ray_train"),
                failure_config=FailureConfig(max_failures=self.max_failures),
            ),
        )
        result = trainer.fit()
        metric = getattr(result, "return_value", None)
        if metric is None:  # Ray Train v1 (RAY_TRAIN_V2_ENABLED=0): what rank 0 reported
            metric = (result.metrics or {}).get("metric", math.nan)
        retried = restarts_line(restarts(output, fit))
        print(f"Ray Train: {workers} worker(s) finished ({kind}); metric {metric:.4f}{retried}")
        return metric
