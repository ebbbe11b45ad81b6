"""Ground-truth checkers for images of the embedded world: which coloured objects an image holds, and whether
they match a prompt's colour, count and position. No learned judge: the world draws flat, saturated shapes
on low-saturation backgrounds, so an object is a connected patch of saturated pixels and its colour is the
nearest colour of the world's palette.

The checkers are validated on real world images (tests/test_drawbench_parts.py) before they judge generated
ones; an image that fails a check carries the reason in its record.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

CHECKS = ("colour", "count", "position")
# Where a group's centre lies, as fractions of the side: the world's regions, told apart by the centre alone.
REGION_TESTS = {
    "left": lambda x, y: x < 0.45,
    "right": lambda x, y: x > 0.55,
    "top": lambda x, y: y < 0.45,
    "bottom": lambda x, y: y > 0.55,
    "center": lambda x, y: abs(x - 0.5) < 0.2 and abs(y - 0.5) < 0.2,
}
RELATION_TESTS = {  # (dx, dy) of the first object's centre minus the second's
    "left_of": lambda dx, dy: dx < 0 and abs(dx) > abs(dy),
    "right_of": lambda dx, dy: dx > 0 and abs(dx) > abs(dy),
    "above": lambda dx, dy: dy < 0 and abs(dy) > abs(dx),
    "below": lambda dx, dy: dy > 0 and abs(dy) > abs(dx),
}


@dataclass(frozen=True)
class WorldObject:
    colour: str
    x: float  # centre, as a fraction of the width
    y: float  # centre, as a fraction of the height
    area: float  # as a fraction of the image


class ObjectFinder:
    """Coloured objects in an image: pixels whose saturation (max − min of RGB) exceeds `min_saturation` and
    whose nearest palette colour lies within `max_distance` are labelled with it; 4-connected patches of such
    pixels larger than `min_area` (fraction of the image) are objects."""

    def __init__(
        self,
        palette: dict[str, tuple[int, int, int]],
        min_saturation: float = 60.0,
        max_distance: float = 90.0,
        min_area: float = 0.002,
    ):
        self.names = list(palette)
        self.palette = np.array([palette[n] for n in self.names], dtype=np.float32)  # (K, 3)
        self.min_saturation, self.max_distance, self.min_area = min_saturation, max_distance, min_area

    def labels(self, image: Image.Image) -> np.ndarray:
        """(H, W) palette index per pixel, −1 for background."""
        rgb = np.asarray(image.convert("RGB"), dtype=np.float32)  # (H, W, 3)
        saturation = rgb.max(-1) - rgb.min(-1)
        distance = np.linalg.norm(rgb[:, :, None, :] - self.palette[None, None], axis=-1)  # (H, W, K)
        nearest = distance.argmin(-1)
        near_enough = np.take_along_axis(distance, nearest[..., None], -1)[..., 0] < self.max_distance
        return np.where((saturation > self.min_saturation) & near_enough, nearest, -1)

    def __call__(self, image: Image.Image) -> list[WorldObject]:
        labels = self.labels(image)
        height, width = labels.shape
        # An object is a 4-connected patch of coloured pixels, whatever their nearest colours: the blend of a
        # red edge with a beige background reads as orange, but belongs to the red object. Its colour is the
        # colour most of its pixels have.
        patches, n = ndimage.label(labels >= 0)
        objects = []
        for index, window in enumerate(ndimage.find_objects(patches), start=1):
            inside = patches[window] == index
            area = int(inside.sum())
            if area < self.min_area * height * width:
                continue
            colour = np.bincount(labels[window][inside], minlength=len(self.names)).argmax()
            ys, xs = np.nonzero(inside)
            cx, cy = xs.mean() + window[1].start + 0.5, ys.mean() + window[0].start + 0.5
            objects.append(WorldObject(self.names[colour], cx / width, cy / height, area / (height * width)))
        return sorted(objects, key=lambda o: -o.area)


def check_colour(truth: dict, objects: list[WorldObject]) -> tuple[bool, str]:
    """Group: every object has the prompt's colour. Relation: one object of each of the two colours."""
    found = sorted(o.colour for o in objects)
    if not objects:
        return False, "no object found"
    if truth["kind"] == "relation":
        wanted = sorted([truth["colour"], truth["colour2"]])
        return found == wanted, f"colours {found}, wanted {wanted}"
    wrong = sorted({c for c in found if c != truth["colour"]})
    return not wrong, f"colours {wrong} besides {truth['colour']}" if wrong else "ok"


def check_count(truth: dict, objects: list[WorldObject]) -> tuple[bool, str]:
    wanted = 2 if truth["kind"] == "relation" else int(truth["count"])
    return len(objects) == wanted, f"{len(objects)} objects, wanted {wanted}"


def check_position(truth: dict, objects: list[WorldObject]) -> tuple[bool, str]:
    """Group: the objects' common centre lies in the named region. Relation: the first-named colour's object
    lies on the named side of the second's."""
    if not objects:
        return False, "no object found"
    if truth["kind"] == "relation":
        first = [o for o in objects if o.colour == truth["colour"]]
        second = [o for o in objects if o.colour == truth["colour2"]]
        if not first or not second:
            return False, f"no {truth['colour'] if not first else truth['colour2']} object to place"
        dx, dy = first[0].x - second[0].x, first[0].y - second[0].y
        return RELATION_TESTS[truth["relation"]](dx, dy), f"offset ({dx:+.2f}, {dy:+.2f}) for {truth['relation']}"
    x = float(np.mean([o.x for o in objects]))
    y = float(np.mean([o.y for o in objects]))
    return REGION_TESTS[truth["position"]](x, y), f"centre ({x:.2f}, {y:.2f}) for {truth['position']}"


CHECKERS = {"colour": check_colour, "count": check_count, "position": check_position}


def judge(truth: dict, objects: list[WorldObject]) -> dict:
    """{check: passed, …, 'correct': all passed, 'reasons': the failed checks' reasons}."""
    record, reasons = {}, []
    for name in truth["checks"]:
        passed, reason = CHECKERS[name](truth, objects)
        record[name] = bool(passed)
        if not passed:
            reasons.append(f"{name}: {reason}")
    record["correct"] = all(record[name] for name in truth["checks"])
    record["reasons"] = "; ".join(reasons)
    return record
