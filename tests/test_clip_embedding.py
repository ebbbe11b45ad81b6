"""Annotation and evaluation embed through one path (`training.clip.encode.ClipEncoder`): the `clip_score`
annotate stores (and the filter ranks by) is the cosine evaluation computes for the same image bytes and
caption, and the stored embeddings are that path's, rounded to float16."""

import dataclasses
import glob
import io

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline.annotate.signals import IMAGE_EXTENSIONS
from pipeline.tar_io import iter_tar_samples
from training.clip.encode import ClipEncoder, cosine

SCORE_TOLERANCE = 1e-4


def scored_rows(meta_dir: str) -> list[dict]:
    rows = pq.read_table(sorted(glob.glob(f"{meta_dir}/0*.parquet"))).to_pylist()
    return [r for r in rows if r["clip_score"] is not None]


def image_bytes_by_key(raw: str) -> dict[str, bytes]:
    found = {}
    for path in sorted(glob.glob(f"{raw}/*.tar")):
        with open(path, "rb") as f:
            for sample in iter_tar_samples(f):
                data = next((sample[e] for e in IMAGE_EXTENSIONS if e in sample), None)
                if data is not None:
                    found[sample["__key__"]] = data
    return found


@pytest.fixture(scope="module")
def pairs(default_world_raw, annotated):
    """Every 4th scored row (about 45 pairs, across shards) with its decoded image."""
    rows = scored_rows(annotated[0])[::4]
    data = image_bytes_by_key(default_world_raw[0])
    images = [Image.open(io.BytesIO(data[r["key"]])).convert("RGB") for r in rows]
    return rows, images


def test_annotate_clip_score_is_evaluations_cosine(pairs, tiny_clip):
    rows, images = pairs
    assert len(rows) >= 40
    captions = [r["caption"] or "" for r in rows]
    encoder = ClipEncoder.from_folder(tiny_clip)
    image_embeddings = encoder.encode_images(images, batch_size=16)
    text_embeddings = encoder.encode_texts(captions, batch_size=16)
    evaluation = cosine(image_embeddings, text_embeddings).numpy()
    stored = np.array([r["clip_score"] for r in rows], np.float32)
    gap = np.abs(stored - evaluation)
    print(f"max |annotate clip_score - evaluation cosine| over {len(rows)} pairs: {gap.max():.2e}")
    assert gap.max() <= SCORE_TOLERANCE, rows[int(gap.argmax())]["key"]
    # pair_scores is the same cosine, in its own batching.
    assert np.abs(encoder.pair_scores(images, captions, batch_size=7).numpy() - evaluation).max() <= 1e-5

    for name, embeddings in (("image_embedding", image_embeddings), ("text_embedding", text_embeddings)):
        stored_embeddings = torch.tensor(np.array([r[name] for r in rows], np.float32))
        agreement = torch.nn.functional.cosine_similarity(stored_embeddings, embeddings, dim=-1)
        assert agreement.min() > 0.999, (name, float(agreement.min()))


def test_the_tolerance_tells_other_preprocessing_apart(pairs, tiny_clip):
    """The comparison above can fail: another normalisation, or another pairing of the same images and
    captions, moves the cosines far beyond the tolerance."""
    rows, images = pairs
    captions = [r["caption"] or "" for r in rows]
    stored = np.array([r["clip_score"] for r in rows], np.float32)
    encoder = ClipEncoder.from_folder(tiny_clip)
    imagenet = dataclasses.replace(encoder, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    assert np.abs(imagenet.pair_scores(images, captions).numpy() - stored).max() > 10 * SCORE_TOLERANCE
    shifted = captions[1:] + captions[:1]
    assert np.abs(encoder.pair_scores(images, shifted).numpy() - stored).max() > 10 * SCORE_TOLERANCE


def test_a_rows_stored_embedding_does_not_depend_on_the_rows_ray_batches_it_with(default_world_raw, tiny_clip):
    """Ray batches annotate's rows as they arrive, so the same image meets other neighbours on every run. The
    scorer's float16 bytes must not move with them, or the same input gets another metadata hash (a CI run saw
    it). Scored all at once, then one row at a time: the same bytes."""
    from pipeline.annotate.clip_scorer import ClipScorer

    data = image_bytes_by_key(default_world_raw[0])
    keys = sorted(data)[:48]
    batch = {
        "key": np.array(keys),
        "image": np.array([data[k] for k in keys], dtype=object),
        "caption": np.array([f"caption {i}" for i in range(len(keys))], dtype=object),
        "error": np.array([None] * len(keys), dtype=object),
    }
    scorer = ClipScorer(tiny_clip, batch_size=16)
    together = scorer({k: v.copy() for k, v in batch.items()})
    for i in range(len(keys)):
        alone = scorer({k: v[i : i + 1].copy() for k, v in batch.items()})
        for name in ("image_embedding", "text_embedding", "clip_score"):
            assert alone[name][0].tobytes() == together[name][i].tobytes(), (keys[i], name)
