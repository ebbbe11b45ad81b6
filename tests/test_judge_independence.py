"""DrawBench's CLIPScore judge against the model's own text encoder: compared by weights, warned about in the
console, the HTML report, results.json and MLflow's tags when they coincide; the demo judges with CLIP v0."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from evaluation.run import evaluate
from evaluation.t2i.judge import judge_independence, same_text_encoder
from support import CONF, eval_config

CAPTIONS = [f"{n} {c} {s} on the {p}" for n in "one two three".split() for c in "red blue green".split()
            for s in "circles squares".split() for p in "left right".split()]  # fmt: skip


def _clip(folder, seed: int) -> str:
    from training.clip.model import ClipBundle, image_processor_for, save_clip
    from training.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(CAPTIONS, vocab_size=300, max_length=32)
    model_cfg = OmegaConf.load(CONF / "model" / "clip_tiny.yaml")
    torch.manual_seed(seed)
    model = instantiate(model_cfg, tokenizer=tokenizer)
    save_clip(str(folder), ClipBundle(model, tokenizer, image_processor_for(int(model_cfg.image_size))))
    return str(folder)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    """Two CLIPs (seeds 0 and 1), a copy of the first elsewhere, and a debug-size pipeline conditioned on the
    first one's text encoder, with lineage.json naming it (as `training.train task=ldm` leaves it)."""
    from training.diffusion.export import assemble_pipeline
    from training.diffusion.unet import load_text_encoder, noise_scheduler
    from training.recipe import write_lineage

    root = tmp_path_factory.mktemp("judge")
    own, other = _clip(root / "clip_v1", 0), _clip(root / "clip_v0", 1)
    copy = shutil.copytree(own, root / "elsewhere" / "clip")
    text_encoder, tokenizer = load_text_encoder(own)
    torch.manual_seed(0)
    unet = instantiate(
        OmegaConf.load(CONF / "model" / "unet_tiny.yaml"),
        sample_size=8,
        in_channels=4,
        cross_attention_dim=text_encoder.config.hidden_size,
    )
    vae = instantiate(OmegaConf.load(CONF / "model" / "vae_tiny.yaml"))
    task = OmegaConf.load(CONF / "task" / "ldm.yaml")
    schedule = noise_scheduler(**{k: v for k, v in task.noise_scheduler.items() if k != "_target_"})
    assemble_pipeline(unet, vae, text_encoder, tokenizer, schedule).save_pretrained(root / "ldm" / "pipeline")
    write_lineage(str(root / "ldm"), {"clip": own})
    return {"pipeline": str(root / "ldm" / "pipeline"), "own": own, "other": other, "copy": str(copy)}


def test_the_judge_is_compared_by_its_weights_not_its_folder(models):
    assert same_text_encoder(models["pipeline"], models["own"])
    assert same_text_encoder(models["pipeline"], models["copy"])  # the same CLIP in another folder
    assert not same_text_encoder(models["pipeline"], models["other"])
    verdict = judge_independence(models["pipeline"], models["copy"], given=True)
    assert not verdict["independent"] and "judge and text encoder coincide (judge=" in verdict["note"]
    assert judge_independence(models["pipeline"], models["other"], given=True)["independent"]


def _run(models, output, *extra):
    return evaluate(
        eval_config(
            "benchmark=drawbench",
            f"pipeline={models['pipeline']}",
            f"output={output}",
            "prompts=world",
            "world_suite.per_category=1",
            "generation.n=1",
            "generation.steps=2",
            "report.bootstrap=20",
            "progress=false",
            *extra,
        )
    )


def test_the_default_judge_is_the_text_encoder_and_the_report_warns(models, tmp_path, monkeypatch, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    record = _run(models, tmp_path / "default")  # no judge=: lineage.json's CLIP, the model's own
    printed = capsys.readouterr().out
    assert record["judge"] == models["own"] and record["judge_independent"] is False
    assert printed.count("warning: judge and text encoder coincide (no judge= given") == 2  # at start and in the end
    html = (tmp_path / "default" / "report.html").read_text()
    assert "<b>Warning:</b> judge and text encoder coincide" in html
    assert json.load(open(tmp_path / "default" / "results.json"))["judge_independent"] is False
    import mlflow

    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("pixelmill-drawbench").experiment_id])
    assert run.data.tags["pixelmill.judge_independent"] == "false"


def test_an_independent_judge_gets_no_warning(models, tmp_path, capsys):
    record = _run(models, tmp_path / "other", f"judge={models['other']}", "tracking=false")
    assert record["judge_independent"] is True and "warning" not in capsys.readouterr().out
    assert "Warning:" not in (tmp_path / "other" / "report.html").read_text()


def test_the_demo_judges_with_clip_v0_not_the_text_encoder(monkeypatch, tmp_path):
    from pipeline.demo import Demo

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        demo = Demo(compose("demo", overrides=[f"output={tmp_path}"]))
        seen = {}
        demo.evaluate = lambda cfg: seen.setdefault("cfg", cfg)
        demo.drawbench("ldm/pipeline", judge="clip_v0/clip")
    assert seen["cfg"].judge == "clip_v0/clip" and seen["cfg"].prompts == "world"
