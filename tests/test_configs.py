"""Every config composes and builds, so none rots: each primary config of conf/, each option of each config
group composed with the primary that uses it, and what they name (`_target_`) instantiated — models on the
meta device (no memory), trainers without starting anything, recipes, launchers and benchmarks as the
functions they pass."""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from support import CONF, stage_config, subprocess_env
from training.errors import missing_keys

# What each primary config needs given before it composes.
PRIMARIES = {
    "crawl": ["input=urls.parquet", "output=raw"],
    "annotate": ["input=raw", "output=meta"],
    "filtering": ["input=meta", "output=selection"],
    "shard": ["input=raw", "selection=selection", "output=shards"],
    "encode": ["input=shards", "output=cache", "vae=vae", "clip=clip"],
    "eval_set": ["output=eval"],
    "world": [],
    "run": ["input=urls.parquet", "output=out"],
    "train": ["data.path=shards", "output=run"],
    "evaluate": [],  # its benchmark's own required keys (clip=, pipeline=, …) stay ??? here
    "demo": [],
    "generate": ["pipeline=t2i", "prompt=a red circle"],
    "download_drawbench": [],
}
# Each experiment preset and the primary config it is written for.
EXPERIMENTS = {
    "demo_data": "run",
    "demo_clip_filter": "run",
    "demo_clip": "train",
    "demo_vae": "train",
    "demo_ldm": "train",
    "demo_drawbench": "evaluate",
}
# Each config group: the primary that composes it, and overrides its options need.
GROUPS = {
    "task": ("train", ["++vae=vae", "++clip=clip"]),  # ++: set where the option has the key, add elsewhere
    "model": ("train", ["++vae=vae", "++clip=clip"]),
    "loss": ("train", []),
    "trainer": ("train", []),
    "launcher": ("train", []),
    "data": ("train", []),
    "benchmark": ("evaluate", []),
    "filter": ("filtering", []),
    "world": ("world", []),
    "sweep_model": ("run", []),
    "caption_negatives": ("train", []),
}
OPTIONAL_GROUPS = {"sweep_model", "caption_negatives"}  # in no defaults list: selected with +group=option
MODEL_TASK = {"clip": "clip", "unet": "ldm", "vae": "vae"}
PUBLISHED = {"unet_sd": (0.85e9, 0.87e9), "vae_sd": (83e6, 85e6), "clip_vit_b32": (150e6, 152e6)}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_every_group_and_primary_is_covered():
    groups = {p.name for p in CONF.iterdir() if p.is_dir()}
    assert groups == set(GROUPS) | {"experiment"}, "a new config group needs an entry in GROUPS"
    assert set(options("experiment")) == set(EXPERIMENTS), "a new experiment needs an entry in EXPERIMENTS"
    assert {p.stem for p in CONF.glob("*.yaml")} == set(PRIMARIES), "a new primary config needs an entry"


@pytest.mark.parametrize("name", sorted(PRIMARIES))
def test_primary_config_composes_and_resolves(name):
    cfg = stage_config(name, *PRIMARIES[name])
    OmegaConf.to_container(cfg, resolve=True)
    # what run_command refuses as not given: nothing once the documented values are
    assert list(missing_keys(cfg)) == (["clip", "dataset"] if name == "evaluate" else [])


def run_module(cwd, module: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m module args…` as a user runs it, in `cwd`; its exit status and output."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env={**subprocess_env(), **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_required_value_left_out_is_one_line_and_exit_2(tmp_path):
    """`output` forgotten: the command names it and stops, where crawl, annotate and filter took `???` for a
    folder name and wrote there, and pipeline.run (whose stage folders interpolate it) died in a traceback."""
    for command, given, missing in [
        ("pipeline.filter", ["input=meta"], "output"),
        ("pipeline.run", ["input=urls.parquet"], "output"),
        ("training.train", ["task=ldm", "data.path=shards", "output=run"], "vae, clip"),
    ]:
        done = run_module(tmp_path, command, *given)
        assert done.returncode == 2, done.stderr[-2000:]
        assert done.stderr.strip().splitlines() == [
            f"error: {missing}: required, not given; add "
            f"{' '.join(k + '=…' for k in missing.split(', '))} to the command"
        ]
    assert not list(tmp_path.rglob("???"))


def test_command_line_mistakes_are_one_line_and_exit_2(tmp_path):
    """What Hydra refuses (an option that does not exist, a key the config lacks, an override it cannot parse)
    and what it composes but a library would refuse deep in a run (a word for a number or a boolean) are each
    named in one line with exit 2; Hydra printed several lines and exited 1, and `lr=abc` ended in AdamW's
    TypeError traceback. Nothing is written."""
    cases = [
        ("pipeline.filter", ["filter=nosuchrule"],
         "filter=nosuchrule: no such option in conf/filter/ (there: basic, clip_score, datacomp_basic, semantic)"),
        ("pipeline.filter", ["near_duplicat.max_distance=3"],
         "near_duplicat.max_distance: no such key in the config (to add a new one: +near_duplicat.max_distance=3)"),
        ("pipeline.filter", ["filter.near_duplicate.max_distance=[3"], "filter.near_duplicate.max_distance=[3: not an "
         "override Hydra can read"),
        ("pipeline.filter", ["filter.near_duplicate.max_distance=auto"],  # "auto" only where a library takes it
         "filter.near_duplicate.max_distance=auto: expected a whole number (the config's value: 20)"),
        ("pipeline.filter", ["filter.near_duplicate.max_distance='20'"],  # quoted: a string, and shown as one
         "filter.near_duplicate.max_distance='20': expected a whole number"),
        ("pipeline.filter", ["tracking=yes"], "tracking=yes: expected true or false"),
        ("training.train", ["+experiment=demo_clip", "module.optimizer.lr=abc"],
         "module.optimizer.lr=abc: expected a number (the config's value: 0.002)"),
    ]  # fmt: skip
    for command, given, message in cases:
        primary = "filtering" if command == "pipeline.filter" else "train"
        done = run_module(tmp_path, command, *PRIMARIES[primary], *given)
        assert done.returncode == 2, done.stderr[-2000:]
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), done.stderr[-2000:]
    assert not (tmp_path / "selection").exists() and not (tmp_path / "run").exists()
    # "auto" stands for a number where Lightning takes one (trainer.devices): it passes, the missing data stops
    done = run_module(tmp_path, "training.train", *PRIMARIES["train"], "trainer.devices=auto")
    assert done.returncode == 2 and done.stderr.strip().startswith("error: shard shards does not exist"), done.stderr
    # A DDP rank or Ray worker inherits the HYDRA_FULL_ERROR that pixelmill set (with its marker): still one line.
    # The user's own HYDRA_FULL_ERROR=1 brings Hydra's traceback back.
    for marker, one_line in (({"PIXELMILL_SET_HYDRA_FULL_ERROR": "1"}, True), ({}, False)):
        env = {"HYDRA_FULL_ERROR": "1", **marker}
        done = run_module(tmp_path, "pipeline.filter", *PRIMARIES["filtering"], "filter=nosuchrule", env=env)
        assert (len(done.stderr.strip().splitlines()) == 1) is one_line, done.stderr[-2000:]


def test_a_constructor_refusing_its_config_is_one_line():
    """Hydra's InstantiationException (a `_target_` that refuses its arguments, or that does not exist) is a
    user error naming the config key, the target and the innermost reason, not a traceback; so is a `${…}` that
    does not resolve."""
    from training.errors import user_error

    cfg = stage_config("train", *PRIMARIES["train"], "task=vae", "model.norm_num_groups=5")
    with pytest.raises(Exception) as refused:
        instantiate(cfg.model)
    assert str(user_error(refused.value)) == (
        "model: training.diffusion.autoencoder.build_vae: num_channels (32) must be divisible by num_groups (5)"
    )
    unresolved = OmegaConf.create({"trainer": {"max_steps": "${oc.env:PIXELMILL_TEST_NO_SUCH_VARIABLE}"}})
    with pytest.raises(Exception) as interpolation:
        unresolved.trainer.max_steps  # noqa: B018 (reading it resolves it)
    assert "Environment variable 'PIXELMILL_TEST_NO_SUCH_VARIABLE' not found" in str(user_error(interpolation.value))
    with pytest.raises(Exception) as missing:
        instantiate(OmegaConf.create({"optimizer": {"_target_": "torch.optim.Nope"}}).optimizer)
    assert str(user_error(missing.value)) == "optimizer: torch.optim.Nope: No module named 'torch.optim.Nope'"


@pytest.mark.parametrize("experiment", sorted(EXPERIMENTS))
def test_experiment_composes(experiment):
    primary = EXPERIMENTS[experiment]
    extra = ["vae=vae", "clip=clip"] if experiment == "demo_ldm" else []
    cfg = stage_config(primary, f"+experiment={experiment}", *PRIMARIES[primary], *extra)
    OmegaConf.to_container(cfg, resolve=True)
    if primary == "train":
        assert isinstance(instantiate(cfg.recipe), functools.partial)


def group_config(group: str, option: str):
    primary, extra = GROUPS[group]
    overrides = [*PRIMARIES[primary], f"{group}={option}"]
    if group == "model":
        overrides.append(f"task={MODEL_TASK[option.split('_')[0]]}")
    if group in OPTIONAL_GROUPS:
        overrides[-1] = f"+{overrides[-1]}"
    return stage_config(primary, *overrides, *extra)


@pytest.mark.parametrize("group,option", [(g, o) for g in sorted(GROUPS) for o in options(g)])
def test_group_option_composes_and_what_it_names_builds(group, option):
    cfg = group_config(group, option)
    OmegaConf.to_container(cfg, resolve=True)
    if group == "task":
        assert isinstance(instantiate(cfg.recipe), functools.partial)
        instantiate(cfg.module.optimizer)
    elif group == "loss":
        assert isinstance(instantiate(cfg.loss), torch.nn.Module)
    elif group == "trainer":
        trainer_cfg = cfg.trainer
        if trainer_cfg.accelerator == "gpu" and not torch.cuda.is_available():
            trainer_cfg.accelerator = "cpu"  # the rest of the GPU config still builds
        trainer = instantiate(trainer_cfg, logger=False, enable_checkpointing=False, default_root_dir="unused")
        assert trainer.max_steps == cfg.trainer.max_steps
    elif group == "launcher":
        assert callable(instantiate(cfg.launcher))
    elif group == "data":
        assert instantiate(cfg.data, _partial_=True).func.__name__ == "ShardDataModule"
    elif group == "benchmark":
        assert callable(instantiate(cfg.run)) and cfg.task == option
    elif group == "filter":
        from pipeline.filter.run import build_rules

        assert build_rules(OmegaConf.to_container(cfg.filter, resolve=True))
    elif group == "sweep_model":
        assert callable(instantiate(cfg.sweep_model.train)) and callable(instantiate(cfg.sweep_model.evaluate))
    elif group == "caption_negatives":
        assert callable(instantiate(cfg.data.caption_negatives))


def build_on_meta(option: str):
    """The model of conf/model/<option>.yaml with no memory: on the meta device, with the inputs its recipe
    would give it."""
    cfg = OmegaConf.load(CONF / "model" / f"{option}.yaml")
    with torch.device("meta"):
        if option.startswith("clip"):
            from training.tokenizer import train_tokenizer

            context = int(cfg.text.max_position_embeddings) if "text" in cfg else 77
            tokenizer = train_tokenizer(["a red circle", "two blue squares"], vocab_size=300, max_length=context)
            if option == "clip_vit_b32":
                tokenizer = _vocab_sized(tokenizer, 49408)  # the published vocabulary size
            return instantiate(cfg, tokenizer=tokenizer)
        if option.startswith("unet"):
            return instantiate(
                cfg,
                sample_size=32 if option == "unet_sd" else 8,
                in_channels=4,
                cross_attention_dim=768 if option == "unet_sd" else 64,
            )
        return instantiate(cfg)


class _vocab_sized:
    """A tokenizer that reports another vocabulary size: the published CLIP's, for a parameter count."""

    def __init__(self, tokenizer, size: int):
        self._tokenizer, self._size = tokenizer, size

    def __len__(self) -> int:
        return self._size

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


@pytest.mark.parametrize("option", [o for o in options("model") if o != "clip_pretrained"])
def test_model_builds_on_the_meta_device(option):
    model = build_on_meta(option)
    parameters = list(model.parameters())
    assert parameters and all(p.device.type == "meta" for p in parameters)
    count = sum(p.numel() for p in parameters)
    if option in PUBLISHED:
        low, high = PUBLISHED[option]
        assert low <= count <= high, (
            f"{option}: {count / 1e6:.1f}M parameters, published {low / 1e6:.0f}–{high / 1e6:.0f}M"
        )


def test_configs_name_no_missing_target():
    """Every `_target_` in conf/ resolves to something importable."""
    from hydra.utils import get_object

    targets = set()
    for path in CONF.rglob("*.yaml"):
        for line in Path(path).read_text().splitlines():
            line = line.split("#")[0]
            if "_target_:" in line:
                targets.add(line.split("_target_:")[1].split(",")[0].strip(" }"))
    assert len(targets) > 20
    for target in sorted(targets):
        get_object(target)
