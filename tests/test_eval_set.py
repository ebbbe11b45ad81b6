"""Held-out sets in clip_benchmark's layout, from the world and from a folder of labelled images."""

import subprocess
import sys

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from pipeline.errors import StageError
from pipeline.eval_set.export import export_eval_set
from support import ROOT, stage_config


def read_set(folder, split="test"):
    n = int(open(f"{folder}/{split}/nshards.txt").read())
    urls = [f"{folder}/{split}/{i}.tar" for i in range(n)]
    return n, list(wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("jpg", "cls", "txt"))


def test_world_colour_set_labels_match_pixels(tmp_path):
    manifest = export_eval_set(stage_config("eval_set", f"output={tmp_path}", "n=60", "samples_per_shard=25"))
    n, samples = read_set(tmp_path)
    classes = open(tmp_path / "classnames.txt").read().split()
    templates = open(tmp_path / "zeroshot_classification_templates.txt").read().splitlines()
    assert n == 3 and len(samples) == 60 == manifest["counts"]["samples"]
    assert classes == ["red", "orange", "yellow", "green", "blue", "purple"] and all("{c}" in t for t in templates)
    for _image, label, caption in samples:
        assert classes[label] in caption  # the caption names the labelled colour
    assert len({label for _, label, _ in samples}) >= 5


def test_folder_set_and_errors(tmp_path):
    for name, colour in (("cat", (200, 50, 50)), ("sea_lion", (50, 50, 200))):
        (tmp_path / "in" / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (20, 20), colour).save(tmp_path / "in" / name / f"{i}.jpg")
    export_eval_set(stage_config("eval_set", "source=folder", f"path={tmp_path / 'in'}", f"output={tmp_path / 'out'}"))
    _, samples = read_set(tmp_path / "out")
    assert open(tmp_path / "out" / "classnames.txt").read().split("\n")[:2] == ["cat", "sea lion"]
    assert [label for _, label, _ in samples] == [0, 0, 0, 1, 1, 1]
    assert np.asarray(samples[4][0])[10, 10, 2] > 150
    with pytest.raises(StageError, match="attribute='mood'"):
        export_eval_set(stage_config("eval_set", f"output={tmp_path / 'x'}", "attribute=mood"))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.eval_set",
            "source=folder",
            f"path={tmp_path / 'none'}",
            f"output={tmp_path / 'y'}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        f"error: path={tmp_path / 'none'} holds no class folders; expected <path>/<class name>/<image files>"
    ]
