"""Which CLIP scores a text-to-image model (CLIPScore), and whether it is independent of that model.

A judge whose text tower is the model's own text encoder flatters the model: the UNet learned to draw what
that encoder's embeddings say, and the judge reads prompts through the same embeddings. So the judge should be
a CLIP the model was not trained with (`judge=`; the demo takes CLIP v0, its latent diffusion conditions on
CLIP v1). Without `judge=` the CLIP named in `lineage.json` is used, and the report says it coincides.
"""

from __future__ import annotations

import json
import os

import torch

from training.clip.model import require_clip_folder
from training.diffusion.unet import load_text_encoder
from training.errors import UserError


def judge_folder(model: str, judge_path: str | None) -> str:
    """The CLIP that scores: `judge=`, else the CLIP the model was trained with (`lineage.json` beside a
    pipeline exported by `training.train task=ldm`)."""
    if judge_path:
        require_clip_folder(judge_path, "judge")
        return judge_path
    lineage = os.path.join(os.path.dirname(os.path.abspath(model)), "lineage.json")
    if not os.path.isfile(lineage):
        raise UserError(
            f"judge=<CLIP folder> is needed: model={model} has no lineage.json beside it naming "
            f"the CLIP it was trained with"
        )
    clip = json.load(open(lineage))["clip"]
    require_clip_folder(clip, "judge (from lineage.json)")
    return clip


def same_text_encoder(model: str, judge: str) -> bool:
    """Whether the judge's text tower holds exactly the weights of the pipeline's text encoder: compared by
    value, so a copy of the same CLIP in another folder, or a Hub CLIP whose text tower a Hub pipeline ships
    (Stable Diffusion 1.x and OpenAI's ViT-L/14), counts as the same."""
    ours, theirs = (load_text_encoder(path)[0].state_dict() for path in (model, judge))
    return ours.keys() == theirs.keys() and all(
        ours[k].shape == theirs[k].shape and torch.equal(ours[k], theirs[k]) for k in ours
    )


def judge_independence(model: str, judge: str, given: bool) -> dict:
    """{"independent": bool, "note": str}: what the report says about the judge. `given`: judge= was set."""
    source = "judge=" if given else "no judge= given, so the CLIP in lineage.json"
    if same_text_encoder(model, judge):
        note = (
            f"judge and text encoder coincide ({source}: {judge}): CLIPScore reads prompts through the encoder "
            "the model was trained on, which flatters it; pass judge=<a CLIP the model was not trained with>"
        )
        return {"independent": False, "note": note}
    return {"independent": True, "note": f"judge independent of the model's text encoder ({source}: {judge})"}
