"""Evaluation metrics against values worked out by hand (ties, classes without samples, several captions
per image, chunking), templates, and one-line errors for bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from evaluation.run import evaluate
from evaluation.zeroshot.metrics import classification_metrics, retrieval_metrics
from evaluation.zeroshot.templates import IMAGENET_80, fill, resolve_templates
from support import eval_config
from training.errors import UserError, run_command


def test_classification_metrics_by_hand_with_ties_and_an_empty_class():
    scores = torch.tensor(
        [
            [0.9, 0.1, 0.0],  # true 0: first
            [0.5, 0.5, 0.2],  # true 1: tied with class 0, and a tie counts against the model → second
            [0.2, 0.3, 0.1],  # true 0: second, class 1 predicted
            [0.1, 0.8, 0.3],  # true 1: first
            [1.0, 0.0, 0.0],  # true 0: first
        ]
    )
    labels = torch.tensor([0, 1, 0, 1, 0])
    result = classification_metrics(scores, labels, num_classes=3, ks=(1, 2))
    assert result["metrics"]["acc1"] == pytest.approx(3 / 5)
    assert result["metrics"]["acc2"] == pytest.approx(1.0)
    # Class 0: 2 of 3, class 1: 1 of 2, class 2 has no samples and stays out of the mean.
    assert result["per_class_recall"][:2] == pytest.approx([2 / 3, 1 / 2]) and math.isnan(result["per_class_recall"][2])
    assert result["metrics"]["mean_per_class_recall"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert result["confusion"].tolist() == [[2, 1, 0], [1, 1, 0], [0, 0, 0]]
    assert result["support"].tolist() == [3, 2, 0]
    flat = classification_metrics(torch.zeros(4, 3), torch.tensor([0, 1, 2, 0]), 3)  # a collapsed model
    assert flat["metrics"]["acc1"] == 0.0


def test_retrieval_with_several_captions_per_image_by_hand():
    images = torch.eye(3)  # so that text · image is the text row's entry for that image
    texts = torch.tensor(
        [
            [0.2, 0.9, 0.1],  # caption of image 0; image 1 scores higher → rank 1
            [0.8, 0.1, 0.3],  # caption of image 0 → rank 0
            [0.5, 0.5, 0.0],  # caption of image 1, tied with image 0 → rank 1
            [0.1, 0.2, 0.7],  # caption of image 2 → rank 0
        ]
    )
    text_image = torch.tensor([0, 0, 1, 2])
    # Image → text: image 0's best caption (0.8) leads; image 1's (0.5) trails caption 0 (0.9); image 2 leads.
    expected = {
        "image_retrieval_recall@1": 2 / 4,
        "image_retrieval_recall@2": 1.0,
        "text_retrieval_recall@1": 2 / 3,
        "text_retrieval_recall@2": 1.0,
    }
    for chunk in (1, 2, 1024):
        assert retrieval_metrics(images, texts, text_image, ks=(1, 2), chunk=chunk) == pytest.approx(expected)


def test_retrieval_chunks_agree_on_a_larger_random_case():
    g = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(50, 8, generator=g), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(120, 8, generator=g), dim=-1)
    text_image = torch.randint(0, 45, (120,), generator=g)  # some images without captions
    whole = retrieval_metrics(images, texts, text_image, chunk=10_000)
    assert retrieval_metrics(images, texts, text_image, chunk=7) == pytest.approx(whole)
    # Recall@10 by brute force for text → image.
    ranks = []
    for j in range(120):
        scores = texts[j] @ images.T
        ranks.append(int((scores >= scores[text_image[j]]).sum()) - 1)
    assert whole["image_retrieval_recall@10"] == pytest.approx(np.mean(np.array(ranks) < 10))


def test_templates_named_from_the_dataset_from_a_file_or_a_list(tmp_path):
    assert len(IMAGENET_80) == len(set(IMAGENET_80)) == 80 and all("{}" in t for t in IMAGENET_80)
    assert resolve_templates("dataset", str(tmp_path)) == IMAGENET_80  # no templates file there
    (tmp_path / "zeroshot_classification_templates.txt").write_text("a {c}.\nthe {c} again.\n")
    assert resolve_templates("dataset", str(tmp_path)) == ["a {c}.", "the {c} again."]
    mine = tmp_path / "mine.txt"
    mine.write_text("art of {}\n")
    assert resolve_templates(str(mine), str(tmp_path)) == ["art of {}"]
    assert fill("a {c} and {c}", "cat") == "a cat and cat" and fill("a {}.", "dog") == "a dog."
    with pytest.raises(UserError, match="no {c}"):
        resolve_templates(["a photo."], str(tmp_path))


def test_bad_model_or_dataset_is_one_line_naming_it(tmp_path, tiny_clip, capsys):
    (tmp_path / "set" / "test").mkdir(parents=True)
    (tmp_path / "set" / "test" / "nshards.txt").write_text("0\n")
    cases = [
        (f"clip={tmp_path}/no_model", f"dataset={tmp_path}/set", f"{tmp_path}/no_model"),
        (f"clip={tiny_clip}", f"dataset={tmp_path}/set", "classnames.txt"),
        (f"clip={tiny_clip}", f"dataset={tmp_path}/nothing", f"{tmp_path}/nothing"),
    ]
    for model, dataset, needle in cases:
        cfg = eval_config(model, dataset, "tracking=false", f"output={tmp_path}/out.json")
        with pytest.raises(SystemExit) as exit_info:
            run_command(evaluate, cfg)
        assert exit_info.value.code == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0]
