"""DrawBench-style evaluation, piece by piece: prompt files and their download, the world suite and its
ground-truth checkers on real world images, CLIPScore, bootstrap intervals and win rates."""

from __future__ import annotations

import collections
import csv
import http.server
import io
import random
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from evaluation.t2i.metrics import bootstrap_crossed_mean, bootstrap_mean, clip_scores, pairwise_outcomes
from evaluation.t2i.prompt_suites import (
    DRAWBENCH_CATEGORIES,
    WORLD_CATEGORIES,
    read_prompt_csv,
    world_suite,
    world_vocabulary,
)
from evaluation.t2i.world_checks import ObjectFinder, judge
from pipeline.world.render import encode_jpeg, render
from pipeline.world.scene import Vocabulary
from support import DRAWBENCH_COUNTS, DRAWBENCH_CSV, ROOT, drawbench_like_csv, needs_official_drawbench, subprocess_env
from training.errors import UserError


def official_style(path, source=DRAWBENCH_CSV) -> str:
    """A `prompt,category` CSV rewritten as the Imagen sheet exports it: `Prompts,Category`, an extra column,
    CRLF line ends, a blank row."""
    rows = list(csv.DictReader(open(source, newline="")))
    buffer = io.StringIO()
    writer = csv.writer(buffer)  # CRLF by default
    writer.writerow(["Prompts", "Category", "Notes"])
    for i, row in enumerate(rows):
        writer.writerow([row["prompt"], row["category"], ""])
        if i == 3:
            writer.writerow(["", "", ""])
    path.write_text(buffer.getvalue(), newline="")
    return str(path)


@needs_official_drawbench
def test_both_header_styles_give_the_200_prompts_in_11_categories(tmp_path):
    plain = read_prompt_csv(str(DRAWBENCH_CSV))
    official = read_prompt_csv(official_style(tmp_path / "official.csv"))
    assert official == plain and len(plain) == 200
    assert dict(collections.Counter(p.category for p in plain)) == DRAWBENCH_COUNTS
    assert set(DRAWBENCH_CATEGORIES) == set(DRAWBENCH_COUNTS)
    assert any("\n" not in p.text and "," in p.text for p in plain)  # quoted commas survive

    bad = tmp_path / "bad.csv"
    bad.write_text("text,kind\na cat,Animals\n")
    with pytest.raises(UserError, match=r"bad.csv: header \['text', 'kind'\] lacks a Prompt\(s\) and a Category"):
        read_prompt_csv(str(bad))
    with pytest.raises(UserError, match="missing.csv: no such file"):
        read_prompt_csv(str(tmp_path / "missing.csv"))


class _Files(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_download_command_against_a_local_server(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    source = drawbench_like_csv(tmp_path / "source.csv")  # the command's checks, not the official text
    official_style(served / "drawbench.csv", source)
    (served / "page.html").write_text("<html><body>Sign in to continue</body></html>")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: _Files(*a, directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"

    def download(name: str, output):
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "evaluation.t2i.download_drawbench",
                f"url={base}/{name}",
                f"output={output}",
                "hydra.run.dir=" + str(tmp_path / "hydra"),
            ],
            cwd=ROOT,
            env=subprocess_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )

    try:
        done = download("drawbench.csv", tmp_path / "data" / "drawbench.csv")
        assert done.returncode == 0, done.stderr
        assert "200 prompts in 11 categories" in done.stdout
        written = tmp_path / "data" / "drawbench.csv"
        assert written.read_text().splitlines()[0] == "prompt,category"
        assert read_prompt_csv(str(written)) == read_prompt_csv(str(source))

        for name, message in (
            ("nothing.csv", "download failed (HTTP Error 404"),
            ("page.html", "did not give a prompt CSV"),
        ):
            failed = download(name, tmp_path / "other.csv")
            lines = failed.stderr.strip().splitlines()
            assert failed.returncode == 2 and len(lines) == 1 and message in lines[0] and name in lines[0]
            assert not (tmp_path / "other.csv").exists()
    finally:
        server.shutdown()


def test_world_suite_is_deterministic_and_covers_its_categories():
    prompts = world_suite(per_category=20, seed=0)
    assert prompts == world_suite(per_category=20, seed=0) and prompts != world_suite(per_category=20, seed=1)
    counts = collections.Counter(p.category for p in prompts)
    assert counts == {c: 20 for c in WORLD_CATEGORIES}
    assert len({p.text for p in prompts}) == 100
    by_text = {p.text: p.truth for p in prompts}
    conflicting = [p.truth for p in prompts if p.category == "Conflicting"]
    assert all(t["shape"] == t["shape2"] and t["colour"] != t["colour2"] for t in conflicting)
    assert all(set(p.truth["checks"]) <= {"colour", "count", "position"} and p.truth["checks"] for p in prompts)
    assert any(t["count"] == 4 and "count" in t["checks"] for t in by_text.values() if t["kind"] == "group")


def scene_from_truth(truth: dict, vocab: dict, rng: random.Random) -> dict:
    """A world scene showing exactly what the truth states; what it leaves open is drawn at random."""
    return {
        "kind": truth["kind"],
        "shape": truth["shape"],
        "colour": truth["colour"],
        "size": truth.get("size") or rng.choice(list(vocab["sizes"])),
        "background": truth.get("background") or rng.choice(vocab["backgrounds"]),
        "layout_seed": rng.randrange(2**31),
        "count": truth.get("count", 1),
        "position": truth.get("position") or rng.choice(vocab["positions"]),
        "shape2": truth.get("shape2"),
        "colour2": truth.get("colour2"),
        "relation": truth.get("relation"),
    }


OPPOSITE = {
    "left": "right",
    "right": "left",
    "top": "bottom",
    "bottom": "top",
    "left_of": "right_of",
    "right_of": "left_of",
    "above": "below",
    "below": "above",
}


def contradicted(truth: dict, rng: random.Random) -> dict:
    """The truth with the attribute its first check tests changed, so a correct checker must say no."""
    wrong = dict(truth)
    check = truth["checks"][0]
    if check == "colour" and truth["kind"] == "relation":
        wrong["colour"], wrong["colour2"] = truth["colour2"], truth["colour"]  # the same colours, bound the other way
    elif check == "colour":
        wrong["colour"] = rng.choice([c for c in ("red", "green", "blue", "purple") if c != truth["colour"]])
    elif check == "count":
        wrong["count"] = truth["count"] - 1 if truth["count"] > 1 else 3
    elif truth["kind"] == "relation":
        wrong["relation"] = OPPOSITE[truth["relation"]]
    else:
        wrong["position"] = OPPOSITE.get(truth["position"], rng.choice(["left", "right", "top", "bottom"]))
        if truth["position"] == "center":  # a side region's shapes may sit near the middle: use a far one
            wrong["position"] = "left"
    return wrong


@pytest.mark.parametrize("side", [128, 32])
def test_checkers_pass_real_world_images_and_refuse_wrong_ones(side):
    """The world renders each prompt's truth (JPEG as served, resized to `side` as training sees it): the
    checkers must accept ≥ 98%; rendered from a contradicting truth, they must refuse ≥ 98%."""
    vocab = world_vocabulary()
    draw_vocab, finder, rng = Vocabulary.from_config(vocab), ObjectFinder(vocab["colours"]), random.Random(side)
    prompts = world_suite(20, seed=0) + world_suite(20, seed=1)

    def image_of(truth):
        scene = scene_from_truth(truth, vocab, rng)
        image = Image.open(io.BytesIO(encode_jpeg(render(scene, draw_vocab, 128), 90))).convert("RGB")
        return image.resize((side, side), Image.Resampling.BICUBIC) if side != 128 else image

    accepted = [judge(p.truth, finder(image_of(p.truth))) for p in prompts for _ in range(2)]
    refused = [judge(p.truth, finder(image_of(contradicted(p.truth, rng)))) for p in prompts for _ in range(2)]
    accept_rate = np.mean([r["correct"] for r in accepted])
    refuse_rate = 1 - np.mean([r["correct"] for r in refused])
    print(f"{side}px: accepted {accept_rate:.3f} of true images, refused {refuse_rate:.3f} of wrong ones")
    assert accept_rate >= 0.98 and refuse_rate >= 0.98
    assert all(r["reasons"] == "" for r in accepted if r["correct"])
    assert all(r["reasons"] for r in refused if not r["correct"])

    blank = Image.new("RGB", (side, side), (128, 128, 128))
    for prompt in prompts[:: len(prompts) // 10]:
        verdict = judge(prompt.truth, finder(blank))
        assert not verdict["correct"] and ("no object" in verdict["reasons"] or "0 objects" in verdict["reasons"])


def test_clip_score_is_the_formula_on_a_hand_made_case(tiny_clip):
    """2.5 · max(cos, 0), cosines taken through CLIPModel's own forward (logits / logit scale)."""
    from training.clip.encode import ClipEncoder
    from training.clip.model import load_clip

    encoder = ClipEncoder.from_bundle(load_clip(tiny_clip))
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(4)]
    pictures += [Image.new("RGB", (32, 32), colour) for colour in ((0, 0, 0), (255, 255, 255), (220, 40, 40))]
    captions = [
        "a red circle",
        "two blue squares on the left",
        "a star",
        "four green triangles at the top",
        "an orange diamond above a purple circle",
        "a photo",
        "",
    ]
    images = [p for p in pictures for _ in captions]  # every pair
    texts = [c for _ in pictures for c in captions]
    pixels = torch.stack([encoder.transform()(image) for image in pictures])
    tokens = encoder.tokenizer(
        captions, padding="max_length", truncation=True, max_length=encoder.context_length, return_tensors="pt"
    )
    signs = set()
    for flip in (False, True):  # the text projection negated flips every cosine: both signs are covered
        if flip:
            with torch.no_grad():
                encoder.model.text_projection.weight.neg_()
        scores = clip_scores(encoder, images, texts, batch_size=16)
        with torch.no_grad():
            out = encoder.model(
                pixel_values=pixels, input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
            )
            cosine = (out.logits_per_image / encoder.model.logit_scale.exp()).flatten().numpy()  # (images × captions)
        assert np.allclose(scores, 2.5 * np.maximum(cosine, 0), atol=1e-5)
        assert (scores[cosine <= 0] == 0).all() and (scores[cosine > 0] > 0).all()
        signs |= set(np.sign(cosine).tolist())
    assert {-1.0, 1.0} <= signs


def test_bootstrap_interval_and_win_rates_by_hand():
    assert pairwise_outcomes([0.3, 0.2, 0.25, 0.1], [0.2, 0.2, 0.3, 0.1 + 1e-9]).tolist() == [1.0, 0.5, 0.0, 0.5]
    constant = bootstrap_mean([0.5] * 30)
    assert constant == {"mean": 0.5, "low": 0.5, "high": 0.5}
    values = np.random.default_rng(1).normal(0.3, 0.1, 400)
    interval = bootstrap_mean(values, resamples=2000)
    assert interval["mean"] == pytest.approx(values.mean())
    half_width = 1.96 * values.std(ddof=1) / np.sqrt(values.size)  # the normal approximation, for comparison
    assert interval["high"] - interval["low"] == pytest.approx(2 * half_width, rel=0.1)
    assert interval["low"] < values.mean() < interval["high"]
    assert bootstrap_mean(values, seed=3) == bootstrap_mean(values, seed=3)


def test_crossed_bootstrap_counts_a_seed_shared_by_every_prompt_once():
    """40 prompts judged on the same 2 images, one passing everything, one nothing: resampling prompts alone
    sees no spread at all, resampling seeds as well does (each resample draws the pair, one image twice, …)."""
    shared = np.tile([1.0, 0.0], (40, 1))  # (prompts, seeds)
    assert bootstrap_mean(shared.mean(1)) == {"mean": 0.5, "low": 0.5, "high": 0.5}
    crossed = bootstrap_crossed_mean(shared, resamples=2000)
    assert crossed["mean"] == 0.5 and crossed["low"] == 0.0 and crossed["high"] == 1.0
    # Independent cells: the prompts-only interval is then right, and the crossed one errs wide, not narrow
    # (a resample of 2 seeds draws one seed twice half the time).
    rng = np.random.default_rng(0)
    cells = rng.normal(0.3, 0.1, (400, 2))
    both, prompts_only = bootstrap_crossed_mean(cells), bootstrap_mean(cells.mean(1))
    assert both["mean"] == pytest.approx(cells.mean())
    width, right = both["high"] - both["low"], prompts_only["high"] - prompts_only["low"]
    assert right <= width <= 2 * right
    # Missing cells are left out, not counted as zeros; an all-missing grid has no mean.
    holes = np.array([[1.0, np.nan], [1.0, 1.0]])
    assert bootstrap_crossed_mean(holes) == {"mean": 1.0, "low": 1.0, "high": 1.0}
    assert np.isnan(bootstrap_crossed_mean(np.full((3, 2), np.nan))["mean"])
