"""`make demo`: the whole flow on the embedded world, in minutes on a laptop.

serve the world → crawl → annotate → filter (rules) → shard → CLIP v0 → zero-shot eval → annotate with CLIP v0 →
filter by CLIP score → shard → CLIP v1 (same budget) → zero-shot eval → autoencoder → latent cache → latent diffusion →
DrawBench-style eval on the world suite, judged by CLIP v0 (the LDM conditions on CLIP v1, so its CLIPScore is
not read through its own text encoder) → a summary: the funnel, what the CLIP-score filter did to the world's
mismatched captions (ground truth), v0 against v1, DrawBench per category, and how to open MLflow.

Training and evaluation are called through the `_target_`s in conf/demo.yaml: the data pipeline imports
neither (DESIGN.md, "Who imports whom"). Each step's settings are a preset in conf/experiment/ (`demo_*`).
"""

from __future__ import annotations

import json
import os
import shutil
import time

import hydra
from hydra import compose
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from pipeline.encode.run import encode
from pipeline.errors import run_stage
from pipeline.eval_set.export import export_eval_set
from pipeline.run import run_pipeline
from pipeline.world.__main__ import write_and_serve
from pipeline.world.truth import crawl_agreement, mismatch_scores
from training.command_line import hydra_entry


class Demo:
    """The demo's steps in order; each writes under `output` and returns what the summary needs."""

    def __init__(self, cfg: DictConfig):
        self.cfg, self.out = cfg, os.path.abspath(str(cfg.output))
        self.train, self.evaluate = instantiate(cfg.steps.train), instantiate(cfg.steps.evaluate)
        self.timings: dict[str, float] = {}

    def timed(self, name: str, label: str, work):
        """Run `work`, print its duration under `label`, keep it for the summary under `name`."""
        start = time.perf_counter()
        result = work()
        self.timings[name] = time.perf_counter() - start
        print(f"\n── {label}: {self.timings[name]:.0f} s ──")
        return result

    def config(self, primary: str, step: str, *overrides: str, preset: str | None = None) -> DictConfig:
        """`primary` (train, evaluate, run) with the step's preset from conf/experiment/, `overrides`, then
        the step's extra overrides from the demo config."""
        preset = preset or self.cfg.experiments[step]
        return compose(primary, overrides=[f"+experiment={preset}", *overrides, *self.cfg.overrides.get(step, [])])

    def pipeline(self, step: str, *overrides: str) -> dict:
        """pipeline.run with the step's preset and overrides."""
        return run_pipeline(
            self.config(
                "run",
                "data",
                f"input={self.out}/world/urls.parquet",
                f"output={self.out}",
                *overrides,
                preset=self.cfg.experiments[step],
            )
        )

    def eval_sets(self) -> dict[str, str]:
        sets = {}
        for attribute in self.cfg.eval_attributes:
            sets[attribute] = f"{self.out}/eval/{attribute}"
            export_eval_set(
                compose(
                    "eval_set",
                    overrides=[f"attribute={attribute}", f"output={sets[attribute]}", f"n={self.cfg.eval_set_size}"],
                )
            )
        return sets

    def clip(self, name: str, shards: str) -> str:
        self.train(self.config("train", "clip", f"data.path={shards}", f"output={self.out}/{name}"))
        return f"{self.out}/{name}/clip"

    def zeroshot(self, name: str, model: str, sets: dict[str, str]) -> dict[str, float]:
        return {
            attribute: self.evaluate(
                compose(
                    "evaluate",
                    overrides=[
                        f"clip={model}",
                        f"dataset={path}",
                        f"output={self.out}/eval_results/{name}_{attribute}.json",
                        "progress=false",
                    ],
                )
            )["metrics"]["acc1"]
            for attribute, path in sets.items()
        }

    def diffusion(self, shards: str, clip: str, round_trip_scenes: str) -> str:
        self.train(
            self.config(
                "train",
                "vae",
                f"data.path={shards}",
                f"output={self.out}/vae",
                # the round trip of held-out world scenes through the world checkers: the ceiling of the LDM
                "+callbacks.round_trip._target_=evaluation.t2i.round_trip.RoundTripCallback",
                f"+callbacks.round_trip.dataset={round_trip_scenes}",
            )
        )
        vae = f"{self.out}/vae/vae"
        latents = self.latent_cache(shards, vae, clip)
        self.train(
            self.config(
                "train",
                "ldm",
                f"data.path={latents}",
                f"output={self.out}/ldm",
                f"vae={vae}",
                f"clip={clip}",
            )
        )
        return f"{self.out}/ldm/pipeline"

    def latent_cache(self, shards: str, vae: str, clip: str) -> str:
        """The autoencoder's latents and the text encoder's states of every training pair, computed once
        (pipeline.encode): the UNet's 3,000 steps then skip both encoders, 1.4× faster here (bench/RESULTS.md)."""
        output = f"{self.out}/latents"
        options = [f"input={shards}", f"output={output}", f"vae={vae}", f"clip={clip}", "progress=false"]
        encode(compose("encode", overrides=[*options, *self.cfg.overrides.get("encode", [])]))
        return output

    def drawbench(self, model: str, judge: str) -> dict:
        return self.evaluate(
            self.config("evaluate", "drawbench", f"pipeline={model}", f"judge={judge}", f"output={self.out}/drawbench")
        )


def demo(cfg: DictConfig) -> dict:
    steps = Demo(cfg)
    out = steps.out
    server = write_and_serve(
        DictConfig({"world": cfg.world, "output": f"{out}/world", "host": cfg.host, "port": cfg.port})
    )
    try:
        v0_data = steps.timed("data", "crawl → annotate → filter (rules) → shard", lambda: steps.pipeline("data"))
        sets = steps.timed("eval sets", "held-out eval sets", steps.eval_sets)
        clip_v0 = steps.timed("CLIP v0", "CLIP v0", lambda: steps.clip("clip_v0", v0_data["config"]["output"]))
        v0 = steps.timed("zero-shot v0", "zero-shot v0", lambda: steps.zeroshot("v0", clip_v0, sets))
        v1_data = steps.timed(
            "CLIP filter",
            "annotate with CLIP v0 → filter by CLIP score → shard",
            lambda: steps.pipeline("clip_filter", f"annotate.output={out}/meta_clip_v0", f"clip={clip_v0}"),
        )
    finally:
        server.stop()
    clip_v1 = steps.timed(
        "CLIP v1", "CLIP v1 (same budget)", lambda: steps.clip("clip_v1", v1_data["config"]["output"])
    )
    v1 = steps.timed("zero-shot v1", "zero-shot v1", lambda: steps.zeroshot("v1", clip_v1, sets))
    pipeline = steps.timed(
        "diffusion",
        "autoencoder → latent cache → latent diffusion",
        lambda: steps.diffusion(v1_data["config"]["output"], clip_v1, next(iter(sets.values()))),
    )
    # The judge is CLIP v0: trained apart from CLIP v1 (rule-filtered data, its own run), whose text encoder the
    # latent diffusion model conditions on; no extra training time.
    bench = steps.timed(
        "DrawBench", "DrawBench-style eval (world suite)", lambda: steps.drawbench(pipeline, judge=clip_v0)
    )
    summary = summarise(cfg, out, v0_data, v1_data, v0, v1, bench, steps.timings)
    with open(f"{out}/summary.json", "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def read_json(path: str):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def drawbench_table(bench: dict) -> list[str]:
    """The summary's DrawBench lines: per category, the share correct, the same model's share with empty prompts
    judged against the same truths, and the gain over it with its interval ("–" where the run had no
    empty-prompt reference: benchmark.empty_prompt_reference=false)."""
    lines = [
        f"{'DrawBench (world suite)':<30}{'prompts':>10}{'correct':>10}{'empty prompt':>14}"
        f"{'gain over empty [95% CI]':>27}{'CLIPScore':>11}"
    ]
    for category, entry in bench["categories"].items():
        correct, clip_score = entry["correct"]["mean"], entry["clip_score"]["mean"]
        empty = f"{entry['empty_prompt_correct']['mean']:.3f}" if "empty_prompt_correct" in entry else "–"
        gain = entry.get("gain_over_empty")
        interval = f"{gain['mean']:+.3f} [{gain['low']:+.3f}, {gain['high']:+.3f}]" if gain else "–"
        lines.append(
            f"  {category:<28}{entry['prompts']:>10}{correct:>10.3f}{empty:>14}{interval:>27}{clip_score:>11.3f}"
        )
    return lines


def summarise(cfg, out: str, v0_data: dict, v1_data: dict, v0: dict, v1: dict, bench: dict, timings: dict) -> dict:
    truth = f"{out}/world/ground_truth.parquet"
    agree, rows = crawl_agreement(truth, f"{out}/raw")
    mismatch = mismatch_scores(truth, f"{out}/raw", v1_data["config"]["selection"])
    removed = mismatch["mismatched_removed"] / max(mismatch["mismatched"], 1)
    kept = mismatch["clean_kept"] / max(mismatch["clean"], 1)
    funnel = open(os.path.join(v0_data["config"]["selection"], "funnel.txt")).read().rstrip()
    print("\n" + "═" * 72 + "\npixelmill demo: summary\n" + "═" * 72)
    print(f"crawl: {agree} of {rows} rows ended as the world's ground truth expects")
    print(f"filter funnel (rules):\n{funnel}")
    print(
        f"CLIP-score filter (CLIP v0): removed {mismatch['mismatched_removed']} of {mismatch['mismatched']} "
        f"mismatched captions ({removed:.0%}), kept {mismatch['clean_kept']} of {mismatch['clean']} clean pairs "
        f"({kept:.0%}); training shards {v0_data['counts']['samples']} → {v1_data['counts']['samples']}"
    )
    print(f"{'zero-shot top-1 (held out)':<30}{'CLIP v0':>10}{'CLIP v1':>10}")
    for attribute in v0:
        print(f"  {attribute:<28}{v0[attribute]:>10.3f}{v1[attribute]:>10.3f}")
    round_trip = read_json(f"{out}/vae/round_trip.json")
    if round_trip:
        checks = ", ".join(f"{k} {v:.3f}" for k, v in round_trip["round_trip"].items())
        print(
            f"autoencoder round trip of {round_trip['scenes']} held-out world scenes: {checks} "
            f"(the originals at its size: {round_trip['original']['correct']:.3f})"
        )
    conditioning = read_json(f"{out}/ldm/conditioning.json")
    if conditioning:
        gains = " → ".join(f"{e['gain']:.3f}" for e in conditioning)
        print(
            f"conditioning gain (share of the UNet's error its caption removes) at steps {conditioning[0]['step']}–"
            f"{conditioning[-1]['step']}: {gains}"
        )
    print("\n".join(drawbench_table(bench)))
    grid = f"{out}/ldm/samples.png"
    if os.path.exists(grid):
        shutil.copyfile(grid, f"{out}/drawbench/samples.png")
        print(f"  samples (rows: seeds; columns: prompts, the last one empty): {out}/drawbench/samples.png")
    independent = "independent of" if bench["judge_independent"] else "identical to"
    print(f"  CLIPScore judge: CLIP v0, {independent} the latent diffusion model's text encoder (CLIP v1)")
    total = sum(timings.values())
    print(f"time: {total / 60:.1f} min (" + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + ")")
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{os.path.abspath('mlflow.db')}"
    print(f"results: {out}/  ·  DrawBench report: {out}/drawbench/report.html")
    print(f"MLflow:  mlflow ui --backend-store-uri {uri}   (then open http://127.0.0.1:5000)")
    return {
        "crawl_agreement": [agree, rows],
        "mismatch": mismatch,
        "mismatch_removed": removed,
        "clean_kept": kept,
        "zeroshot_v0": v0,
        "zeroshot_v1": v1,
        "drawbench": bench["metrics"],
        "round_trip": round_trip,
        "conditioning": conditioning,
        "drawbench_judge": {"clip": bench["judge"], "independent": bench["judge_independent"]},
        "seconds": timings,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


@hydra.main(version_base="1.3", config_path="../conf", config_name="demo")
def main(cfg: DictConfig) -> None:
    run_stage(demo, cfg)


if __name__ == "__main__":
    hydra_entry(main)
