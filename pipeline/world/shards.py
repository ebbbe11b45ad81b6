"""Training shards straight from the world's scenes, with no crawl: what tests and benchmarks of training
use when the crawl is not what they measure."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf

from pipeline.storage import Location
from pipeline.tar_io import TarSampleWriter
from pipeline.world.render import encode_jpeg, render
from pipeline.world.scene import Vocabulary, caption, sample_scene

DEFAULT_WORLD = Path(__file__).resolve().parents[2] / "conf" / "world" / "default.yaml"


def write_world_shards(
    folder, n: int, per_shard: int, image_size: int = 48, first_index: int = 0, corrupt: tuple[int, ...] = (), **world
) -> str:
    """Training shards straight from the world's scenes (no crawl): `{key}.jpg` + `{key}.txt`, keys numbered
    from `first_index`, and `sizes.json`. Samples whose number is in `corrupt` get truncated JPEG bytes."""
    cfg = OmegaConf.load(DEFAULT_WORLD)
    for key, value in world.items():
        OmegaConf.update(cfg, key, value, merge=False)  # replace: a smaller palette drops the other colours
    vocab = Vocabulary.from_config(cfg)
    location = Location(str(folder))
    location.makedirs()
    sizes = {}
    for start in range(0, n, per_shard):
        name = f"{start // per_shard:05d}.tar"
        writer = TarSampleWriter(location, name)
        for i in range(first_index + start, first_index + min(start + per_shard, n)):
            scene = sample_scene(vocab, 0, i, 0.0)
            image = encode_jpeg(render(scene, vocab, image_size), 90)
            if i in corrupt:
                image = image[: len(image) // 3]
            writer.add({"__key__": f"{i:09d}", "jpg": image, "txt": caption(scene, phrasing=i).encode()})
        writer.close()
        sizes[name] = writer.samples
    with open(f"{folder}/sizes.json", "w") as f:
        json.dump(sizes, f)
    return str(folder)
