"""`ZeroShotCallback`: zero-shot classification on eval sets every N training steps, with the same code as
`python -m evaluation.run`, logged to the training run (`zeroshot/<name>/acc1`, …). Attached by config:

    callbacks:
      zeroshot:
        _target_: evaluation.zeroshot.callback.ZeroShotCallback
        datasets: {world_colour: data/eval/colour}
        every_n_steps: 500

Works under every strategy: the model is gathered to rank 0 (FSDP shards included), evaluated there, and
the other ranks wait.
"""

from __future__ import annotations

import pytorch_lightning as pl

from evaluation.zeroshot.benchmark import zeroshot_classification
from evaluation.zeroshot.datasets import EvalSet
from evaluation.zeroshot.templates import resolve_templates
from training.clip.encode import ClipEncoder
from training.clip.export import gather_clip
from training.clip.model import ClipBundle, image_processor_for


class ZeroShotCallback(pl.Callback):
    def __init__(
        self,
        datasets: dict[str, str],
        every_n_steps: int = 500,
        templates="dataset",
        batch_size: int = 64,
        num_workers: int = 0,
        at_end: bool = True,
    ):
        self.eval_sets = {name: EvalSet.open(str(path), need_classnames=True) for name, path in dict(datasets).items()}
        self.templates = {name: resolve_templates(templates, s.path) for name, s in self.eval_sets.items()}
        self.every_n_steps, self.batch_size, self.num_workers = int(every_n_steps), int(batch_size), int(num_workers)
        self.at_end = bool(at_end)
        self.last_step = -1

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step == self.last_step:
            return
        self.last_step = trainer.global_step
        model = gather_clip(trainer, pl_module)
        if model is not None:
            # The image processor the export will write beside these weights: the numbers logged here are
            # the ones `python -m evaluation.run` gives for the exported folder.
            processor = image_processor_for(model.config.vision_config.image_size)
            bundle = ClipBundle(model, trainer.datamodule.tokenizer, processor)
            encoder = ClipEncoder.from_bundle(bundle, pl_module.device)
            metrics = {}
            for name, eval_set in self.eval_sets.items():
                result = zeroshot_classification(
                    encoder,
                    eval_set,
                    eval_set.classnames,
                    self.templates[name],
                    self.batch_size,
                    self.num_workers,
                    progress=False,
                )
                metrics.update({f"zeroshot/{name}/{k}": v for k, v in result["metrics"].items()})
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
        trainer.strategy.barrier("zeroshot")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step > 0 and trainer.global_step % self.every_n_steps == 0:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.at_end:
            self.evaluate(trainer, pl_module)
