"""`export_eval_set(cfg)`: a classification (and retrieval) set in clip_benchmark's webdataset layout:

    {output}/{split}/nshards.txt, {output}/{split}/{i}.tar ({key}.jpg, {key}.cls, {key}.txt[, {key}.json]),
    {output}/classnames.txt, {output}/zeroshot_classification_templates.txt, {output}/manifest.json

From the world: scenes of one group of shapes, labelled by one attribute, at image indices no URL list uses;
each also carries its scene as `{key}.json` (colour, count, position, …) for the world checkers.
From a folder: `<path>/<class name>/<image>`, classes in name order.
"""

from __future__ import annotations

import json
import os
import time

from omegaconf import DictConfig, OmegaConf

from pipeline.errors import StageError
from pipeline.storage import MANIFEST, Location, write_manifest
from pipeline.tar_io import TarSampleWriter
from pipeline.world.render import encode_jpeg, render
from pipeline.world.scene import COUNT_WORDS, POSITION_PHRASES, Vocabulary, caption, plural, sample_scene

IMAGE_EXTENSIONS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}


def world_classnames(vocab: Vocabulary, attribute: str) -> tuple[list, list[str]]:
    """(attribute values, their class names as a caption would say them)."""
    if attribute == "shape":
        return list(vocab.shapes), list(vocab.shapes)
    if attribute == "colour":
        return list(vocab.colours), list(vocab.colours)
    if attribute == "count":
        return list(COUNT_WORDS), [f"{w} shape" if n == 1 else f"{w} {plural('shape')}" for n, w in COUNT_WORDS.items()]
    if attribute == "position":
        return list(vocab.positions), [POSITION_PHRASES[p] for p in vocab.positions]
    if attribute == "size":
        return list(vocab.sizes), list(vocab.sizes)
    if attribute == "background":
        return list(vocab.backgrounds), list(vocab.backgrounds)
    raise StageError(f"attribute={attribute!r}; expected one of shape, colour, count, position, size, background")


def scene_truth(scene: dict) -> dict:
    """What the world checkers (evaluation/t2i/world_checks.py) judge an image of `scene` against: the group's
    colour, count and position, all three checked."""
    keys = ("kind", "shape", "colour", "count", "position", "size", "background")
    return {**{k: scene[k] for k in keys}, "checks": ["colour", "count", "position"]}


def world_samples(cfg: dict):
    """(image bytes, class index, caption, scene truth) for `n` held-out group scenes."""
    world = cfg["world"]
    vocab = Vocabulary.from_config(world)
    values, _ = world_classnames(vocab, cfg["attribute"])
    index, made = int(cfg["first_index"]), 0
    while made < int(cfg["n"]):
        scene = sample_scene(vocab, int(world["seed"]), index, float(world["relation_fraction"]))
        index += 1
        if scene["kind"] != "group":  # two objects: no single colour, shape or position to name
            continue
        image = encode_jpeg(render(scene, vocab, int(world["image_size"])), int(world["jpeg_quality"]))
        yield image, "jpg", values.index(scene[cfg["attribute"]]), caption(scene, phrasing=index), scene_truth(scene)
        made += 1


def folder_samples(path: str) -> tuple[list[str], list]:
    root = Location(path)
    classes = [c for c in root.listdir() if root.fs.isdir(root.path(c))]
    if not classes:
        raise StageError(f"path={path} holds no class folders; expected <path>/<class name>/<image files>")
    samples = []
    for label, name in enumerate(classes):
        for file in root.listdir(name):
            ext = IMAGE_EXTENSIONS.get(os.path.splitext(file)[1].lower())
            if ext:
                with root.fs.open(root.path(f"{name}/{file}"), "rb") as f:
                    samples.append((f.read(), ext, label, name.replace("_", " "), None))
    if not samples:
        raise StageError(f"path={path} has class folders but no .jpg/.jpeg/.png/.webp images in them")
    return [c.replace("_", " ") for c in classes], samples


def export_eval_set(cfg: DictConfig | dict) -> dict:
    started = time.time()
    cfg = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    if cfg["source"] == "world":
        _, classnames = world_classnames(Vocabulary.from_config(cfg["world"]), cfg["attribute"])
        samples = world_samples(cfg)
        templates = cfg["templates"] or cfg["world_templates"][cfg["attribute"]]
    elif cfg["source"] == "folder":
        if not cfg["path"]:
            raise StageError("source=folder needs path=<folder of class folders>")
        classnames, samples = folder_samples(cfg["path"])
        templates = cfg["templates"] or cfg["folder_templates"]
    else:
        raise StageError(f"source={cfg['source']!r}; expected world or folder")
    out = Location(cfg["output"])
    out.makedirs(cfg["split"])
    out.remove(MANIFEST)
    hashes, per_class = {}, [0] * len(classnames)
    writer, shard, count = None, 0, 0
    for image, ext, label, text, truth in samples:
        if writer is None:
            name = f"{cfg['split']}/{shard}.tar"
            writer = TarSampleWriter(out, name)
        sample = {"__key__": f"s{count:07d}", ext: image, "cls": str(label).encode(), "txt": text.encode()}
        if truth is not None:  # world scenes: what the autoencoder's round trip is judged against
            sample["json"] = json.dumps(truth).encode()
        writer.add(sample)
        per_class[label] += 1
        count += 1
        if writer.samples == int(cfg["samples_per_shard"]):
            hashes[name], writer, shard = writer.close(), None, shard + 1
    if writer is not None:
        hashes[name] = writer.close()
    with out.open_atomic(f"{cfg['split']}/nshards.txt", "w") as f:
        f.write(f"{len(hashes)}\n")
    with out.open_atomic("classnames.txt", "w") as f:
        f.write("\n".join(classnames) + "\n")
    with out.open_atomic("zeroshot_classification_templates.txt", "w") as f:
        f.write("\n".join(templates) + "\n")
    counts = {"samples": count, "classes": len(classnames), "per_class": dict(zip(classnames, per_class))}
    manifest = write_manifest(out, "eval_set", cfg, counts, hashes, started)
    per_class = ", ".join(f"{c} {n}" for c, n in counts["per_class"].items())
    print(f"eval set: {count} samples, {len(classnames)} classes ({per_class}) → {out.url}")
    return manifest
