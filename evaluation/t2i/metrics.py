"""Text-to-image scores: CLIPScore (Hessel et al. 2021), bootstrap confidence intervals over prompts (and
over prompts and seeds, for scores that share a seed's images across prompts), and side-by-side win rates of a
model against a baseline."""

from __future__ import annotations

import numpy as np
from PIL import Image

CLIPSCORE_WEIGHT = 2.5  # Hessel et al.: w = 2.5 stretches cosines of ~0.2–0.4 over a readable range


def clip_scores(encoder, images: list[Image.Image], texts: list[str], batch_size: int = 64) -> np.ndarray:
    """CLIPScore(image, text) = 2.5 · max(cos(E_image, E_text), 0) for each pair, with a CLIP judge
    (`training.clip.encode.ClipEncoder`); texts longer than its context are truncated, as CLIP must."""
    if not images:
        return np.zeros(0)
    cosine = encoder.pair_scores(images, texts, batch_size)  # (N,)
    return (CLIPSCORE_WEIGHT * cosine.clamp(min=0)).numpy()


def bootstrap_mean(values, resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict:
    """Mean of `values` (one per prompt) with a percentile bootstrap interval: prompts are the unit that is
    resampled, since images of one prompt are not independent draws."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return {"mean": float("nan"), "low": float("nan"), "high": float("nan")}
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, (int(resamples), values.size))].mean(1)
    tail = (1 - confidence) / 2
    return {
        "mean": float(values.mean()),
        "low": float(np.quantile(means, tail)),
        "high": float(np.quantile(means, 1 - tail)),
    }


def bootstrap_crossed_mean(values, resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict:
    """Mean of a (prompts, seeds) matrix (NaN where a cell has no value) with an interval that resamples
    prompts and seeds both. For a score that every prompt reads off the same few images of a seed (the empty
    prompt's, judged against each prompt's truth), resampling prompts alone would count those few images as
    many independent draws and give too narrow an interval."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0 or np.isnan(values).all():
        return {"mean": float("nan"), "low": float("nan"), "high": float("nan")}
    rng = np.random.default_rng(seed)
    prompts, seeds = values.shape
    means = np.empty(int(resamples))
    for k in range(int(resamples)):
        cells = values[np.ix_(rng.integers(0, prompts, prompts), rng.integers(0, seeds, seeds))]
        present = ~np.isnan(cells)
        means[k] = cells[present].mean() if present.any() else np.nan
    means = means[~np.isnan(means)]
    tail = (1 - confidence) / 2
    return {
        "mean": float(np.nanmean(values)),
        "low": float(np.quantile(means, tail)),
        "high": float(np.quantile(means, 1 - tail)),
    }


def pairwise_outcomes(model, baseline, tie: float = 1e-6) -> np.ndarray:
    """1 where the model's image scores higher than the baseline's for the same prompt and seed, 0 where
    lower, 0.5 within `tie` (DrawBench's raters could also call it even)."""
    difference = np.asarray(model, dtype=np.float64) - np.asarray(baseline, dtype=np.float64)
    return np.where(np.abs(difference) <= tie, 0.5, (difference > 0).astype(np.float64))
