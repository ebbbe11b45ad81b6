"""Zero-shot evaluation of a CLIP trained for a CPU minute on the world: held-out accuracy far above
chance, the same numbers from the training callback and from `evaluation.run`, results in a real
`mlflow server`, retrieval with several captions per image."""

from __future__ import annotations

import json

import mlflow
import pytest
from omegaconf import OmegaConf

from evaluation.run import evaluate
from pipeline.eval_set.export import export_eval_set
from pipeline.world.shards import write_world_shards
from support import CONF, eval_config, stage_config
from training.train import train

# Shapes drawn large enough to tell apart at the tiny model's 32 px.
SIZES = {"small": 0.22, "medium": 0.28, "large": 0.34}
STEPS = 200


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """clip_tiny trained on 3000 world pairs for 200 steps, zero-shot evaluated on colour and shape every 100
    steps by the callback the config attaches."""
    root = tmp_path_factory.mktemp("world_clip")
    shards = write_world_shards(root / "shards", 3000, 250, image_size=48, sizes=SIZES)
    sets = {}
    for attribute in ("colour", "shape"):
        sets[attribute] = str(root / f"eval_{attribute}")
        export_eval_set(
            stage_config(
                "eval_set",
                f"attribute={attribute}",
                f"output={sets[attribute]}",
                "n=300",
                "world.image_size=48",
                "world.sizes={small:0.22,medium:0.28,large:0.34}",
            )
        )
    uri = f"sqlite:///{root}/mlflow.db"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", uri)
        cfg = stage_config(
            "train",
            f"data.path={shards}",
            f"output={root}/run",
            "data.batch_size=128",
            f"trainer.max_steps={STEPS}",
            "module.optimizer.lr=2e-3",
            "module.warmup_steps=10",
            "trainer.enable_progress_bar=false",
            "checkpoint_every=1000",
            "+callbacks.zeroshot._target_=evaluation.zeroshot.callback.ZeroShotCallback",
            f"+callbacks.zeroshot.datasets={{colour: {sets['colour']}, shape: {sets['shape']}}}",
            "+callbacks.zeroshot.every_n_steps=100",
        )
        train(cfg)
    return {"model": f"{root}/run/clip", "sets": sets, "uri": uri, "root": root}


def test_world_clip_beats_chance_and_the_callback_agrees_with_the_command(trained, tmp_path):
    results = {}
    for attribute, path in trained["sets"].items():
        results[attribute] = evaluate(
            eval_config(
                f"clip={trained['model']}",
                f"dataset={path}",
                "tracking=false",
                f"output={tmp_path}/{attribute}.json",
                "progress=false",
            )
        )
        assert json.load(open(f"{tmp_path}/{attribute}.json")) == json.loads(json.dumps(results[attribute]))
    colour = results["colour"]["metrics"]
    print("world zero-shot:", {a: r["metrics"] for a, r in results.items()})
    assert colour["acc1"] >= 0.6  # 6 classes: chance is 0.17 (measured 0.95 at 200 steps)
    assert results["shape"]["samples"] == 300  # shape is printed, not asserted: see the issue note
    # The training run holds the callback's numbers at steps 100 and 200, and the last equal the command's.
    client = mlflow.MlflowClient(trained["uri"])
    (run,) = client.search_runs([client.get_experiment_by_name("pixelmill-clip").experiment_id])
    history = client.get_metric_history(run.info.run_id, "zeroshot/colour/acc1")
    assert sorted(m.step for m in history) == [100, STEPS]
    last = max(history, key=lambda m: m.step).value
    assert last == pytest.approx(colour["acc1"], abs=1e-6)


def test_results_reach_a_real_mlflow_server_with_tables_pictures_and_lineage(
    trained, shared_mlflow_server, tmp_path, monkeypatch
):
    uri = shared_mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    record = evaluate(
        eval_config(
            f"clip={trained['model']}",
            f"dataset={trained['sets']['colour']}",
            f"output={tmp_path}/colour.json",
            "progress=false",
        )
    )
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("pixelmill-zeroshot")  # one experiment per task
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.metrics["acc1"] == pytest.approx(record["metrics"]["acc1"])
    assert run.data.metrics["mean_per_class_recall"] == pytest.approx(record["metrics"]["mean_per_class_recall"])
    training_run = json.load(open(f"{trained['root']}/run/mlflow_run.json"))["run_id"]
    assert run.data.tags["pixelmill.model_run_id"] == training_run
    assert run.data.tags["pixelmill.dataset_hash"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"per_class.json", "confusion_matrix.png", "results.json"} <= artifacts
    table = json.load(
        open(
            mlflow.artifacts.download_artifacts(
                run_id=run.info.run_id, artifact_path="per_class.json", dst_path=str(tmp_path / "dl")
            )
        )
    )
    assert table["columns"] == ["class", "support", "recall"] and len(table["data"]) == 6


def _retrieval_set(folder, n: int = 100):
    """clip_benchmark retrieval layout: each held-out world image with two captions (two phrasings)."""
    from pipeline.storage import Location
    from pipeline.tar_io import TarSampleWriter
    from pipeline.world.render import encode_jpeg, render
    from pipeline.world.scene import Vocabulary, caption, sample_scene

    cfg = OmegaConf.merge(OmegaConf.load(CONF / "world" / "default.yaml"), {"sizes": SIZES})
    vocab = Vocabulary.from_config(cfg)
    location = Location(str(folder))
    location.makedirs("test")
    writer = TarSampleWriter(location, "test/0.tar")
    for i in range(2_000_000, 2_000_000 + n):
        scene = sample_scene(vocab, 0, i, 0.0)
        captions = f"{caption(scene, phrasing=i)}\n{caption(scene, phrasing=i + 1)}"
        writer.add({"__key__": f"{i}", "jpg": encode_jpeg(render(scene, vocab, 48), 90), "txt": captions.encode()})
    writer.close()
    (folder / "test" / "nshards.txt").write_text("1\n")
    return str(folder)


def test_retrieval_with_two_captions_per_image(trained, tmp_path):
    path = _retrieval_set(tmp_path / "retrieval")
    record = evaluate(
        eval_config(
            "benchmark=retrieval",
            f"clip={trained['model']}",
            f"dataset={path}",
            "tracking=false",
            f"output={tmp_path}/r.json",
            "progress=false",
            "chunk_size=16",
        )
    )
    metrics = record["metrics"]
    assert record["samples"] == 100 and record["captions"] == 200
    print("world retrieval:", metrics)
    # Chance for recall@10 is 0.1 both ways; colour alone narrows 100 images to about 17.
    assert metrics["image_retrieval_recall@10"] >= 0.3 and metrics["text_retrieval_recall@10"] >= 0.3
    assert (
        metrics["image_retrieval_recall@1"]
        <= metrics["image_retrieval_recall@5"]
        <= metrics["image_retrieval_recall@10"]
    )
