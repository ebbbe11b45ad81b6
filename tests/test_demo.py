"""`make demo`'s flow at toy size, so its config and its chain of commands cannot rot: world → data → CLIP v0 →
CLIP-score filter → CLIP v1 → autoencoder → latent cache → latent diffusion → DrawBench, and the summary."""

from __future__ import annotations

import json

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from support import CONF

TOY = {
    "overrides.clip": ["data.batch_size=16", "trainer.max_steps=8", "data.num_workers=0"],
    "overrides.vae": ["data.batch_size=8", "trainer.max_steps=4", "data.num_workers=0"],
    "overrides.ldm": ["data.batch_size=8", "trainer.max_steps=4", "data.num_workers=0"],
    "overrides.drawbench": [
        "world_suite.per_category=1",
        "generation.n=1",
        "generation.steps=2",
        "report.bootstrap=50",
    ],
    "eval_set_size": 20,
}


def test_demo_runs_the_whole_flow_at_toy_size(tmp_path, monkeypatch, ray_local):
    from pipeline.demo import demo

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("demo", overrides=[f"output={tmp_path}/demo", "world.n=240"])
        for key, value in TOY.items():
            OmegaConf.update(cfg, key, value, merge=False)
        summary = demo(cfg)
    assert summary == json.load(open(tmp_path / "demo" / "summary.json"))
    agree, rows = summary["crawl_agreement"]
    assert rows == 240 and agree >= 0.97 * rows
    assert summary["mismatch"]["mismatched"] >= 15  # the injected captions reached the CLIP-score rule
    assert set(summary["zeroshot_v0"]) == set(summary["zeroshot_v1"]) == {"colour", "shape"}
    assert "correct/all" in summary["drawbench"] and "clip_score/Colors" in summary["drawbench"]
    assert summary["drawbench_judge"]["independent"]  # judged by CLIP v0, not the LDM's own text encoder (v1)
    assert (tmp_path / "demo" / "drawbench" / "report.html").exists()
    assert (tmp_path / "demo" / "ldm" / "pipeline" / "model_index.json").exists()
    # The UNet trained from the latent cache, which holds every pair of CLIP v1's shards.
    cache = json.load(open(tmp_path / "demo" / "latents" / "manifest.json"))
    shards = json.load(open(f"{cache['config']['input']}/manifest.json"))
    assert "/shards/" in cache["config"]["input"] and cache["config"]["clip"].endswith("clip_v1/clip")
    assert cache["counts"]["samples"] == shards["counts"]["samples"] > 0 and cache["counts"]["errors"] == 0
    # What shows whether the models learn: the autoencoder's round trip through the world checkers (and the
    # checkers on the originals), the UNet's conditioning gain from step 0, the empty-prompt reference, the grid.
    assert summary["round_trip"]["scenes"] == 20 and summary["round_trip"]["original"]["correct"] >= 0.9
    assert [e["step"] for e in summary["conditioning"]] == [0, 4] and "gain" in summary["conditioning"][-1]
    assert "empty_prompt_correct/Colors" in summary["drawbench"] and "gain_over_empty/Counting" in summary["drawbench"]
    assert (tmp_path / "demo" / "drawbench" / "samples.png").exists()


def test_drawbench_table_says_when_there_is_no_empty_prompt_reference():
    from pipeline.demo import drawbench_table

    figure = {"mean": 0.5, "low": 0.25, "high": 0.75}
    with_reference = {"prompts": 8, "correct": figure, "clip_score": figure, "empty_prompt_correct": figure,
                      "gain_over_empty": {"mean": 0.25, "low": -0.05, "high": 0.5}}  # fmt: skip
    without = {"prompts": 8, "correct": figure, "clip_score": figure}
    header, colors, counting = drawbench_table({"categories": {"Colors": with_reference, "Counting": without}})
    assert "gain over empty [95% CI]" in header
    assert colors.split()[1:] == ["8", "0.500", "0.500", "+0.250", "[-0.050,", "+0.500]", "0.500"]
    assert counting.split()[1:] == ["8", "0.500", "–", "–", "0.500"] and "nan" not in counting
