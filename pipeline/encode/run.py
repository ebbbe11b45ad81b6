"""`encode(cfg)`: image–caption shards → the same shards holding what latent diffusion's frozen encoders
make of them: `{key}.latent.npy` (the autoencoder posterior's mean and log-variance, (2C, h, w)),
`{key}.text.npy` (the CLIP text encoder's states, (T, D)) and `{key}.txt`; with `keep_images`, the image too.
UNet training on these skips both encoders (MosaicML measured ≈1.4× on SD; `bench/train_ldm.py` ours).

One `ShardEncoder` actor call per input shard, each writing its tar, after which the stage driver
(`pipeline.stage`) writes its done record; a rerun after a kill encodes only the shards without one.
Samples that cannot be decoded are listed in `errors.parquet` with their reason. `sizes.json` and
`manifest.json` come last.
"""

from __future__ import annotations

import io
import os
import time

import numpy as np
import pyarrow as pa
from omegaconf import DictConfig, OmegaConf

from pipeline.errors import StageError
from pipeline.stage import Finished, Run, Stage, drive
from pipeline.storage import MANIFEST, Location, config_fingerprint
from pipeline.tar_io import TarSampleWriter, iter_tar_samples

RUN_ONLY = {"output", "processes", "overwrite", "progress", "ray", "batch_size"}
DTYPES = {"float32": np.float32, "float16": np.float16}


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


class ShardEncoder:
    """Loads the frozen encoders once per actor; each call encodes one shard (a batch of one row)."""

    def __init__(self, cfg: dict):
        import torch

        from training.data.transforms import EvalTransform
        from training.diffusion.autoencoder import SYMMETRIC_MEAN, SYMMETRIC_STD, load_vae
        from training.diffusion.unet import load_text_encoder

        torch.set_num_threads(max(1, int(cfg.get("threads_per_actor") or 1)))
        self.cfg, self.torch = cfg, torch
        self.vae = load_vae(cfg["vae"])
        self.text_encoder, self.tokenizer = load_text_encoder(cfg["clip"])
        self.transform = EvalTransform(int(cfg["image_size"]), SYMMETRIC_MEAN, SYMMETRIC_STD)
        self.dtype = DTYPES[cfg["dtype"]]
        self.image_keys, self.caption_key = cfg["image_keys"].split(";"), cfg["caption_key"]

    def _decode(self, sample: dict):
        from PIL import Image

        ext = next(k for k in self.image_keys if k in sample)
        caption = sample[self.caption_key].decode("utf-8").strip()
        with Image.open(io.BytesIO(sample[ext])) as image:
            image.load()
            return self.transform(image), caption, ext

    def _encode(self, items: list, writer: TarSampleWriter) -> None:
        from training.diffusion.unet import encode_text

        with self.torch.no_grad():
            moments = self.vae.encode(self.torch.stack([i["pixels"] for i in items])).latent_dist.parameters
            states = encode_text(self.text_encoder, self.tokenizer, [i["caption"] for i in items])
        for item, latent, text in zip(items, moments.numpy(), states.numpy()):
            sample = {
                "__key__": item["key"],
                "txt": item["caption"].encode(),
                "latent.npy": _npy(latent.astype(self.dtype)),
                "text.npy": _npy(text.astype(self.dtype)),
            }
            if self.cfg["keep_images"]:
                sample[item["ext"]] = item["bytes"]
            writer.add(sample)

    def __call__(self, name: str) -> dict:
        """Encode the input tar `name` into the output tar of that name; returns its done record."""
        source, out = Location(self.cfg["input"]), Location(self.cfg["output"])
        writer = TarSampleWriter(out, name)
        errors, pending, written = [], [], 0
        try:
            with source.fs.open(source.path(name), "rb") as f:
                for sample in iter_tar_samples(f):
                    key = sample.get("__key__", "?")
                    try:
                        pixels, caption, ext = self._decode(sample)
                    except Exception as error:  # truncated image, missing caption: recorded, never fatal
                        errors.append({"key": key, "shard": name, "reason": (str(error) or type(error).__name__)[:300]})
                        continue
                    pending.append({"key": key, "pixels": pixels, "caption": caption, "ext": ext, "bytes": sample[ext]})
                    if len(pending) == int(self.cfg["batch_size"]):
                        self._encode(pending, writer)
                        written, pending = written + len(pending), []
            if pending:
                self._encode(pending, writer)
                written += len(pending)
            sha = writer.close()
        except BaseException:
            writer.abort()
            raise
        return {"shard": name, "samples": written, "sha256": sha, "errors": errors}


def _input_shards(source: Location) -> dict[str, int | None]:
    """Tar names → sample counts (from sizes.json when there is one)."""
    if not source.exists():
        raise StageError(f"input={source.url} does not exist")
    names = sorted(n for n in source.listdir() if n.endswith(".tar"))
    if not names:
        raise StageError(f"input={source.url} holds no .tar shards")
    sizes = source.read_json("sizes.json") if source.exists("sizes.json") else {}
    return {n: sizes.get(n) for n in names}


class EncodeStage(Stage):
    """Units are the input tars ("00000.tar"), each encoded into the output tar of the same name by a
    `ShardEncoder` actor. `_work/` goes once the manifest is written."""

    name, what = "encode", "an encoded shard set"

    def __init__(self, cfg: dict):
        self.started = time.time()
        for key in ("input", "output", "vae", "clip"):
            if "://" not in str(cfg[key]):  # Ray workers may run in another directory than this driver
                cfg[key] = os.path.abspath(os.path.expanduser(str(cfg[key])))
        if cfg["dtype"] not in DTYPES:
            raise StageError(f"dtype={cfg['dtype']!r}; expected float32 or float16")
        from training.diffusion.autoencoder import vae_folder
        from training.diffusion.unet import require_text_encoder_folder

        vae_folder(cfg["vae"]), require_text_encoder_folder(cfg["clip"])  # a bad folder fails here, before Ray starts
        source = Location(cfg["input"])
        self.shards = _input_shards(source)
        self.source_hash = source.read_json(MANIFEST)["content_hash"] if source.exists(MANIFEST) else None
        self.identity = config_fingerprint(
            {
                "config": {k: v for k, v in cfg.items() if k not in RUN_ONLY},
                "input": self.source_hash,
                "shards": self.shards,
            }
        )
        self.cfg, self.output = cfg, Location(cfg["output"])

    def plan(self, work: Location) -> dict:
        return {"units": list(self.shards)}

    def worker(self, retry: bool) -> tuple[type, dict]:
        return ShardEncoder, {"cfg": self.cfg}

    def bar(self, run: Run, units: list[str], retry: bool) -> dict:
        return {"total": sum(self.shards[n] or 0 for n in units) or None, "desc": "encode", "unit": "sample"}

    def advance(self, bar, record: dict) -> None:
        bar.update(record["samples"])

    def finish(self, run: Run) -> Finished:
        out, done = self.output, list(run.done.values())
        errors = [e for d in done for e in d["errors"]]
        out.write_parquet(
            "errors.parquet",
            pa.Table.from_pylist(
                errors, schema=pa.schema([("key", pa.string()), ("shard", pa.string()), ("reason", pa.string())])
            ),
        )
        out.write_json("sizes.json", {d["shard"]: d["samples"] for d in done})
        samples = sum(d["samples"] for d in done)
        counts = {"samples": samples, "errors": len(errors), "shards": len(done)}
        summary = (
            f"encode summary: {samples} samples encoded, {len(errors)} unreadable (errors.parquet), "
            f"{len(done)} shards → {out.url} in {time.time() - self.started:.1f} s"
        )
        hashes = {d["shard"]: d["sha256"] for d in done}
        return Finished(counts, hashes, {"input_content_hash": self.source_hash}, summary)


def encode(cfg: DictConfig | dict) -> dict:
    """Run the encode stage; returns its manifest."""
    cfg = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    return drive(EncodeStage(cfg))
