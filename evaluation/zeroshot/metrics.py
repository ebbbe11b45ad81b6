"""Zero-shot classification and retrieval metrics from embeddings, with clip_benchmark's metric names.

Ties count against the model: a candidate scoring *the same* as the right answer ranks ahead of it. That
makes every metric a deterministic function of the scores (no dependence on sort stability) and never
rewards a collapsed model that scores everything equally.
"""

from __future__ import annotations

import numpy as np
import torch


def truth_ranks(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N, C) scores, (N,) true classes → (N,) how many other classes score at least the true one's."""
    truth = scores.gather(1, labels[:, None])  # (N, 1)
    return (scores >= truth).sum(1) - 1


def classification_metrics(scores: torch.Tensor, labels: torch.Tensor, num_classes: int, ks=(1, 5)) -> dict:
    """acc@k, mean per-class recall (over classes that have samples), per-class recall and support, and the
    confusion matrix (rows: true class, columns: prediction; the prediction is the truth when it ranks first,
    else the best other class)."""
    scores, labels = scores.float(), labels.long()
    ranks = truth_ranks(scores, labels)
    metrics = {f"acc{k}": float((ranks < k).float().mean()) for k in ks}
    others = scores.clone()
    others[torch.arange(len(labels)), labels] = -torch.inf
    predictions = torch.where(ranks == 0, labels, others.argmax(1))
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels.numpy(), predictions.numpy()), 1)
    support = confusion.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, np.diag(confusion) / np.maximum(support, 1), np.nan)
    metrics["mean_per_class_recall"] = float(np.nanmean(recall)) if (support > 0).any() else float("nan")
    return {"metrics": metrics, "per_class_recall": recall, "support": support, "confusion": confusion}


def retrieval_metrics(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_image: torch.Tensor,
    ks=(1, 5, 10),
    chunk: int = 1024,
) -> dict:
    """Recall@k both ways. `text_image[j]` is the image caption j belongs to (several captions per image
    allowed). text→image ("image_retrieval"): is the caption's image in the top k? image→text
    ("text_retrieval"): is any of the image's captions in the top k? Scores are computed `chunk` rows at a
    time, so memory stays at chunk × max(images, texts)."""
    text_image = text_image.long()
    n_images = image_features.shape[0]
    text_ranks = []
    for start in range(0, text_features.shape[0], chunk):
        scores = text_features[start : start + chunk] @ image_features.T  # (c, N)
        truth = scores.gather(1, text_image[start : start + chunk, None])
        text_ranks.append((scores >= truth).sum(1) - 1)
    image_ranks = []
    for start in range(0, n_images, chunk):
        scores = image_features[start : start + chunk] @ text_features.T  # (c, M)
        images = torch.arange(start, min(start + chunk, n_images))
        positive = text_image[None, :] == images[:, None]  # (c, M)
        best = scores.masked_fill(~positive, -torch.inf).max(1).values  # (c,)
        has_caption = positive.any(1)
        image_ranks.append((((scores >= best[:, None]) & ~positive).sum(1))[has_caption])
    text_ranks, image_ranks = torch.cat(text_ranks), torch.cat(image_ranks)
    metrics = {}
    for k in ks:
        metrics[f"image_retrieval_recall@{k}"] = float((text_ranks < k).float().mean())
        metrics[f"text_retrieval_recall@{k}"] = float((image_ranks < k).float().mean())
    return metrics
