"""Prompt templates for zero-shot classification: the 80 ImageNet prompts of the CLIP paper as the named
default `imagenet80`, a dataset folder's own `zeroshot_classification_templates.txt`, a file of one
template per line, or a list in the config. A template holds `{c}` (clip_benchmark's) or `{}` for the
class name."""

from __future__ import annotations

import os

from training.data.sources import Folder
from training.errors import UserError

IMAGENET_80 = [
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
]
NAMED = {"imagenet80": IMAGENET_80, "simple": ["a photo of a {}."]}
DATASET_FILE = "zeroshot_classification_templates.txt"


def read_lines(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def resolve_templates(spec, dataset: str) -> list[str]:
    """`spec`: "dataset" (the folder's file, else imagenet80), a name in NAMED, a file path, or a list."""
    if spec is None or spec == "dataset":
        folder = Folder(dataset)  # local or an fsspec URL, as the eval set itself
        if folder.exists(DATASET_FILE):
            templates = [line.strip() for line in folder.read_text(DATASET_FILE).splitlines() if line.strip()]
        else:
            templates = IMAGENET_80
    elif isinstance(spec, str) and spec in NAMED:
        templates = NAMED[spec]
    elif isinstance(spec, str):
        if not os.path.exists(spec):
            raise UserError(f"templates={spec} is neither a known name ({', '.join(NAMED)}, dataset) nor a file")
        templates = read_lines(spec)
    else:
        templates = [str(t) for t in spec]
    bad = [t for t in templates if "{c}" not in t and "{}" not in t]
    if bad or not templates:
        raise UserError(f"template {bad[0]!r} has no {{c}} or {{}} for the class name" if bad else "no templates given")
    return templates


def fill(template: str, classname: str) -> str:
    return template.replace("{c}", classname).replace("{}", classname)
