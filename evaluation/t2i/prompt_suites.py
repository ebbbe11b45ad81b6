"""Prompt suites for text-to-image evaluation: the official DrawBench CSV (200 prompts, 11 categories), any CSV
in its shape, and pixelmill's *world suite*: prompts in DrawBench's categories that the embedded world can
draw, each with the ground truth its checkers (`evaluation.t2i.world_checks`) score an image against.
"""

from __future__ import annotations

import csv
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from training.errors import UserError

DRAWBENCH_CATEGORIES = (
    "Colors",
    "Conflicting",
    "Counting",
    "DALL-E",
    "Descriptions",
    "Gary Marcus et al.",
    "Misspellings",
    "Positional",
    "Rare Words",
    "Reddit",
    "Text",
)
DEFAULT_DRAWBENCH_CSV = "data/drawbench.csv"  # where `python -m evaluation.t2i.download_drawbench` puts it
WORLD_CONFIG = Path(__file__).resolve().parents[2] / "conf" / "world" / "default.yaml"
PROMPT_HEADERS = ("prompt", "prompts")
CATEGORY_HEADERS = ("category", "categories")

# The world's caption words. Evaluation reads no pipeline code (DESIGN.md, "Who imports whom"), so the few
# phrases a prompt needs are spelt here as the world's captions spell them.
COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
WHERE = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the middle",
}
RELATIONS = {"left_of": "to the left of", "right_of": "to the right of", "above": "above", "below": "below"}
WORLD_CATEGORIES = ("Colors", "Counting", "Positional", "Conflicting", "Descriptions")


@dataclass(frozen=True)
class Prompt:
    text: str
    category: str
    truth: dict | None = field(default=None, compare=False)  # world suite: what a correct image shows


def read_prompt_csv(path: str) -> list[Prompt]:
    """Prompts from a CSV with a `Prompt`/`Prompts`/`prompt` column and a `Category` column (any case; other
    columns ignored; blank rows skipped)."""
    if not os.path.isfile(path):
        raise UserError(
            f"prompts={path}: no such file (expected a CSV with prompt and category columns, 'world', or 'drawbench')"
        )
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = {name.strip().lower(): name for name in reader.fieldnames or []}
        prompt_column = next((columns[h] for h in PROMPT_HEADERS if h in columns), None)
        category_column = next((columns[h] for h in CATEGORY_HEADERS if h in columns), None)
        if prompt_column is None or category_column is None:
            raise UserError(f"prompts={path}: header {reader.fieldnames} lacks a Prompt(s) and a Category column")
        prompts = []
        for line, row in enumerate(reader, start=2):
            text, category = (row.get(prompt_column) or "").strip(), (row.get(category_column) or "").strip()
            if not text:
                continue
            if not category:
                raise UserError(f"prompts={path}: row {line} ({text[:40]!r}) has no category")
            prompts.append(Prompt(text, category))
    if not prompts:
        raise UserError(f"prompts={path}: no prompts in the file")
    return prompts


def world_vocabulary(path: str | None = None) -> dict:
    """The world's shapes, palette, sizes, positions and backgrounds (conf/world/default.yaml by default)."""
    source = Path(path) if path else WORLD_CONFIG
    if not source.is_file():
        raise UserError(f"world config {source} not found")
    cfg = OmegaConf.to_container(OmegaConf.load(source), resolve=True)
    return {key: cfg[key] for key in ("shapes", "colours", "sizes", "positions", "backgrounds")}


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


def _a(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def _things(count: int, colour: str, shape: str) -> str:
    return _a(f"{colour} {shape}") if count == 1 else f"{COUNT_WORDS[count]} {colour} {_plural(shape)}"


def world_prompt(category: str, vocab: dict, rng: random.Random) -> Prompt:
    """One prompt of `category` and its truth: only what the prompt states, plus the checks that apply.
    Conflicting pairs two objects of the same shape in different colours, which the world never draws: the
    model must bind each colour to its place without having seen the combination."""
    shape, colour = rng.choice(vocab["shapes"]), rng.choice(list(vocab["colours"]))
    if category == "Colors":
        return Prompt(
            _a(f"{colour} {shape}"),
            category,
            {"kind": "group", "shape": shape, "colour": colour, "count": 1, "checks": ["colour"]},
        )
    if category == "Counting":
        count = rng.randint(2, 4)
        return Prompt(
            _things(count, colour, shape),
            category,
            {"kind": "group", "shape": shape, "colour": colour, "count": count, "checks": ["count"]},
        )
    if category == "Descriptions":
        count, size = rng.randint(1, 4), rng.choice(list(vocab["sizes"]))
        position, background = rng.choice(vocab["positions"]), rng.choice(vocab["backgrounds"])
        thing = (
            _a(f"{size} {colour} {shape}") if count == 1 else f"{COUNT_WORDS[count]} {size} {colour} {_plural(shape)}"
        )
        return Prompt(
            f"a photo of {thing} {WHERE[position]} on a {background} background",
            category,
            {
                "kind": "group",
                "shape": shape,
                "colour": colour,
                "count": count,
                "size": size,
                "position": position,
                "background": background,
                "checks": ["colour", "count", "position"],
            },
        )
    if category == "Positional" and rng.random() < 0.5:
        position = rng.choice(vocab["positions"])
        return Prompt(
            f"{_a(f'{colour} {shape}')} {WHERE[position]}",
            category,
            {
                "kind": "group",
                "shape": shape,
                "colour": colour,
                "count": 1,
                "position": position,
                "checks": ["position"],
            },
        )
    if category not in ("Positional", "Conflicting"):
        raise UserError(f"world suite category {category!r}; expected one of {', '.join(WORLD_CATEGORIES)}")
    colour2 = rng.choice([c for c in vocab["colours"] if c != colour])
    shape2 = shape if category == "Conflicting" else rng.choice([s for s in vocab["shapes"] if s != shape])
    relation = rng.choice(list(RELATIONS))
    return Prompt(
        f"{_a(f'{colour} {shape}')} {RELATIONS[relation]} {_a(f'{colour2} {shape2}')}",
        category,
        {
            "kind": "relation",
            "shape": shape,
            "colour": colour,
            "shape2": shape2,
            "colour2": colour2,
            "relation": relation,
            "checks": ["colour", "position"] if category == "Conflicting" else ["position"],
        },
    )


def world_suite(per_category: int = 20, seed: int = 0, world_config: str | None = None) -> list[Prompt]:
    """`per_category` distinct prompts in each of WORLD_CATEGORIES, the same for the same seed."""
    vocab = world_vocabulary(world_config)
    rng = random.Random(f"world-suite:{seed}")
    prompts: list[Prompt] = []
    for category in WORLD_CATEGORIES:
        seen: set[str] = set()
        for _ in range(100 * per_category):
            if len(seen) == per_category:
                break
            prompt = world_prompt(category, vocab, rng)
            if prompt.text not in seen:
                seen.add(prompt.text)
                prompts.append(prompt)
    return prompts


def load_prompts(
    spec: str, per_category: int = 20, seed: int = 0, world_config: str | None = None
) -> tuple[str, list[Prompt]]:
    """(suite name, prompts) for `prompts=world`, `prompts=drawbench` (data/drawbench.csv) or a CSV path."""
    if spec == "world":
        return "world", world_suite(per_category, seed, world_config)
    if spec == "drawbench":
        if not os.path.isfile(DEFAULT_DRAWBENCH_CSV):
            raise UserError(
                f"prompts=drawbench reads {DEFAULT_DRAWBENCH_CSV}, which is missing: run "
                f"`python -m evaluation.t2i.download_drawbench` or pass prompts=<csv path>"
            )
        spec = DEFAULT_DRAWBENCH_CSV
    return Path(spec).stem, read_prompt_csv(spec)
