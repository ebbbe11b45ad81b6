"""Zero-shot classification and retrieval of a CLIP model (a `transformers` CLIPModel with its tokenizer)
on an eval set: embeddings from `training.clip.encode.ClipEncoder` in, metrics from
`evaluation.zeroshot.metrics` out."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm import tqdm

from evaluation.zeroshot.datasets import EvalSet
from evaluation.zeroshot.metrics import classification_metrics, retrieval_metrics
from evaluation.zeroshot.templates import fill
from training.clip.encode import ClipEncoder
from training.errors import UserError


def text_classifier(encoder: ClipEncoder, classnames: list[str], templates: list[str]) -> torch.Tensor:
    """(C, D): per class, the mean of its normalised template embeddings, normalised again (CLIP's recipe)."""
    texts = [fill(t, name) for name in classnames for t in templates]
    embeddings = encoder.encode_texts(texts).view(len(classnames), len(templates), -1)
    return F.normalize(embeddings.mean(1), dim=-1)


def encode_set(encoder: ClipEncoder, eval_set: EvalSet, batch_size: int, num_workers: int, progress: bool = True):
    """(image features (N, D), labels (N,), captions per image)."""
    features, labels, captions = [], [], []
    loader = eval_set.loader(encoder.transform(), batch_size, num_workers)
    for batch in tqdm(loader, desc=f"embed {eval_set.name}", unit="batch", disable=not progress, leave=False):
        features.append(encoder.encode_images(batch["pixel_values"], batch_size))
        labels.append(batch["labels"])
        captions.extend(batch["captions"])
    return torch.cat(features), torch.cat(labels), captions


def zeroshot_classification(
    encoder: ClipEncoder,
    eval_set: EvalSet,
    classnames: list[str],
    templates: list[str],
    batch_size: int = 64,
    num_workers: int = 2,
    progress: bool = True,
) -> dict:
    features, labels, _ = encode_set(encoder, eval_set, batch_size, num_workers, progress)
    if (labels < 0).any() or (labels >= len(classnames)).any():
        bad = int(labels[(labels < 0) | (labels >= len(classnames))][0])
        raise UserError(f"{eval_set.path}: class index {bad} outside classnames.txt's {len(classnames)} classes")
    classifier = text_classifier(encoder, classnames, templates)
    result = classification_metrics(features @ classifier.T, labels, len(classnames))
    result["samples"] = len(labels)
    return result


def retrieval(
    encoder: ClipEncoder,
    eval_set: EvalSet,
    batch_size: int = 64,
    num_workers: int = 2,
    chunk: int = 1024,
    progress: bool = True,
) -> dict:
    features, _, captions = encode_set(encoder, eval_set, batch_size, num_workers, progress)
    texts = [c for per_image in captions for c in per_image]
    text_image = torch.tensor([i for i, per_image in enumerate(captions) for _ in per_image])
    metrics = retrieval_metrics(features, encoder.encode_texts(texts), text_image, chunk=chunk)
    return {"metrics": metrics, "samples": len(captions), "captions": len(texts)}
