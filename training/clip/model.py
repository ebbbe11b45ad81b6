"""CLIP as a `transformers` CLIPModel: built from a small config, saved as a folder anyone can open with
`CLIPModel.from_pretrained`, loaded back with its tokenizer and image processor. Knows nothing of training."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoTokenizer, CLIPConfig, CLIPModel
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from training.errors import UserError

# OpenAI CLIP's normalisation; kept so that our folders and the Hub's agree on what a pixel means.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def build_clip(
    tokenizer,
    *,
    projection_dim: int,
    image_size: int,
    patch_size: int,
    vision: dict,
    text: dict,
    logit_scale_init: float = 2.6592,
) -> CLIPModel:
    """A fresh CLIPModel whose text side matches `tokenizer` (vocabulary, special ids, context length)."""
    text = dict(text)
    text.setdefault("max_position_embeddings", tokenizer.model_max_length)
    config = CLIPConfig(
        text_config={
            **text,
            "vocab_size": len(tokenizer),
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        },
        vision_config={**dict(vision), "image_size": image_size, "patch_size": patch_size},
        projection_dim=projection_dim,
        logit_scale_init_value=logit_scale_init,
    )
    return CLIPModel(config)


def image_processor_for(image_size: int, mean=CLIP_MEAN, std=CLIP_STD) -> CLIPImageProcessorPil:
    """Resize the short side, centre-crop, normalise: what CLIP folders on the Hub declare."""
    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(mean),
        image_std=list(std),
    )


@dataclass
class ClipBundle:
    model: CLIPModel
    tokenizer: object
    image_processor: CLIPImageProcessorPil

    @property
    def context_length(self) -> int:
        return int(self.model.config.text_config.max_position_embeddings)


def save_clip(folder: str, bundle: ClipBundle) -> None:
    bundle.model.save_pretrained(folder)  # safetensors
    bundle.tokenizer.save_pretrained(folder)
    bundle.image_processor.save_pretrained(folder)


def require_clip_folder(folder: str, option: str = "model") -> None:
    """A clear one-line error for a path that is not a CLIP folder, before anything heavy is loaded."""
    if not os.path.exists(os.path.join(folder, "config.json")):
        raise UserError(f"{option}={folder} is not a transformers CLIP folder (no config.json there)")


def load_clip(folder: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> ClipBundle:
    """Any `transformers` CLIP folder: ours, or one from the Hub saved to disk."""
    model = CLIPModel.from_pretrained(folder, dtype=dtype) if dtype else CLIPModel.from_pretrained(folder)
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    try:
        processor = CLIPImageProcessorPil.from_pretrained(folder)
    except OSError:  # a folder without preprocessor_config.json: OpenAI's defaults at the model's size
        processor = image_processor_for(model.config.vision_config.image_size)
    return ClipBundle(model, tokenizer, processor)


class ContrastiveClip(nn.Module):
    """A CLIPModel as the contrastive losses use it: normalised embeddings plus the temperature (and, for
    SigLIP, a learnable logit bias, which CLIPModel has no slot for and the export leaves out). Returning the
    temperature from `forward` keeps every parameter use inside one forward call, which sharding needs."""

    def __init__(self, clip: CLIPModel, logit_bias: float | None = None):
        super().__init__()
        self.clip = clip
        # FSDP2 shards along dim 0 and refuses 0-d parameters: hold the temperature as shape (1,) while
        # training; `export_state` turns it back into CLIPModel's scalar.
        if clip.logit_scale.ndim == 0:
            clip.logit_scale = nn.Parameter(clip.logit_scale.detach().reshape(1))
        self.logit_bias = nn.Parameter(torch.tensor([float(logit_bias)])) if logit_bias is not None else None

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        negative_input_ids: torch.Tensor | None = None,
        negative_attention_mask: torch.Tensor | None = None,
    ):
        """(image, text, temperature, bias, negative text): (N, D), (N, D), (), (1,) or None, (k·N, D) or None.
        Hard negative captions go through the text tower in the same pass as the true ones."""
        n = input_ids.shape[0]
        if negative_input_ids is not None:
            input_ids = torch.cat([input_ids, negative_input_ids])
            attention_mask = torch.cat([attention_mask, negative_attention_mask])
        out = self.clip(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask)
        bias = self.logit_bias * 1.0 if self.logit_bias is not None else None
        text, negative = out.text_embeds[:n], out.text_embeds[n:] if negative_input_ids is not None else None
        return out.image_embeds, text, self.clip.logit_scale.squeeze(0), bias, negative

    def activation_checkpointing_enable(self, **kwargs) -> None:
        self.clip.activation_checkpointing_enable(**kwargs)

    @staticmethod
    def export_state(clip_state: dict) -> dict:
        """The CLIPModel state dict as `transformers` expects it (a scalar temperature)."""
        return {**clip_state, "logit_scale": clip_state["logit_scale"].reshape(())}
