"""`ExportClip`: the CLIP being trained as a `transformers` folder (`CLIPModel.from_pretrained`) with its
tokenizer and image processor, rewritten after every validation and at the end."""

from __future__ import annotations

import pytorch_lightning as pl
from transformers import CLIPModel

from training.clip.model import ClipBundle, ContrastiveClip, image_processor_for, save_clip
from training.export import FolderExport, full_state_dict


def gather_clip(trainer: pl.Trainer, pl_module: pl.LightningModule) -> CLIPModel | None:
    """The model being trained as a plain CLIPModel on rank 0's CPU (None elsewhere), whatever the strategy:
    gathered from the root that FSDP sharded (ContrastiveClip), then the CLIPModel's part of it. Every rank
    must call it."""
    config = pl_module.net.clip.config
    whole = full_state_dict(pl_module.net)  # on rank 0 only: the others get an empty dict
    if not trainer.is_global_zero:
        return None
    state = ContrastiveClip.export_state(
        {k.removeprefix("clip."): v for k, v in whole.items() if k.startswith("clip.")}
    )
    fresh = CLIPModel(config)  # on CPU, not meta: non-persistent buffers (position ids) are not in `state`
    fresh.load_state_dict(state)
    return fresh.eval()


class ExportClip(FolderExport):
    def __init__(self, folder: str, tokenizer):
        super().__init__(folder)
        self.tokenizer = tokenizer

    def saver(self, trainer, pl_module):
        fresh = gather_clip(trainer, pl_module)
        if fresh is None:
            return None
        bundle = ClipBundle(fresh, self.tokenizer, image_processor_for(fresh.config.vision_config.image_size))
        return lambda staging: save_clip(staging, bundle)
