"""Scenes of the embedded world: what an image holds, sampled deterministically, and captions that say it.

A scene is either a *group* (1–4 identical shapes of one colour and size, placed together in one region of
the image) or a *relation* (two different single shapes, one left of / right of / above / below the other).
Every scene is a plain dict, so it travels as a ground-truth row unchanged.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the middle",
}
RELATION_PHRASES = {
    "left_of": "to the left of",
    "right_of": "to the right of",
    "above": "above",
    "below": "below",
}


@dataclass(frozen=True)
class Vocabulary:
    """The world's words: read from `conf/world/*.yaml`, shared by the generator and the evaluators."""

    shapes: tuple[str, ...]
    colours: dict[str, tuple[int, int, int]]
    sizes: dict[str, float]
    positions: tuple[str, ...]
    backgrounds: tuple[str, ...]

    @classmethod
    def from_config(cls, cfg) -> Vocabulary:
        return cls(
            shapes=tuple(cfg["shapes"]),
            colours={name: tuple(int(c) for c in rgb) for name, rgb in cfg["colours"].items()},
            sizes={name: float(r) for name, r in cfg["sizes"].items()},
            positions=tuple(cfg["positions"]),
            backgrounds=tuple(cfg["backgrounds"]),
        )


def plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


def sample_scene(vocab: Vocabulary, seed: int, index: int, relation_fraction: float) -> dict:
    """The scene of world image `index`: a pure function of (seed, index), so any worker can rebuild it."""
    rng = random.Random(f"{seed}:scene:{index}")
    scene = {
        "index": index,
        "kind": "relation" if rng.random() < relation_fraction else "group",
        "shape": rng.choice(vocab.shapes),
        "colour": rng.choice(list(vocab.colours)),
        "size": rng.choice(list(vocab.sizes)),
        "background": rng.choice(vocab.backgrounds),
        "layout_seed": rng.randrange(2**31),
        "count": 1,
        "position": "center",
        "shape2": None,
        "colour2": None,
        "relation": None,
    }
    if scene["kind"] == "group":
        scene["count"] = rng.randint(1, 4)
        scene["position"] = rng.choice(vocab.positions)
    else:
        scene["shape2"] = rng.choice([s for s in vocab.shapes if s != scene["shape"]])
        scene["colour2"] = rng.choice([c for c in vocab.colours if c != scene["colour"]])
        scene["relation"] = rng.choice(list(RELATION_PHRASES))
    return scene


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _thing(count: int, colour: str, shape: str, digits: bool = False) -> str:
    if count == 1:
        return f"{article(colour)} {colour} {shape}"
    number = str(count) if digits else COUNT_WORDS[count]
    return f"{number} {colour} {plural(shape)}"


def caption(scene: dict, phrasing: int) -> str:
    """One of several phrasings of the scene; `phrasing` picks which (any int, taken modulo)."""
    if scene["kind"] == "relation":
        a = _thing(1, scene["colour"], scene["shape"])
        b = _thing(1, scene["colour2"], scene["shape2"])
        rel = RELATION_PHRASES[scene["relation"]]
        options = [
            f"{a} {rel} {b}",
            f"a picture of {a} {rel} {b}",
            f"{a} and {b}; the {scene['shape']} is {rel} the {scene['shape2']}",
            f"{a} {rel} {b} on a {scene['background']} background",
        ]
    else:
        thing = _thing(scene["count"], scene["colour"], scene["shape"])
        where = POSITION_PHRASES[scene["position"]]
        options = [
            f"{thing} {where}",
            f"a photo of {thing} {where}",
            f"{thing} on a {scene['background']} background",
            f"an image with {_thing(scene['count'], scene['colour'], scene['shape'], digits=True)} {where}",
            f"{scene['size']} {scene['colour']} {plural(scene['shape']) if scene['count'] > 1 else scene['shape']}, "
            f"{COUNT_WORDS[scene['count']]} in all, {where}",
        ]
    return options[phrasing % len(options)]
