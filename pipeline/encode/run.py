"""`encode(cfg)`: image–caption shards → the same shards holding what latent diffusion's frozen encoders
make of them: `{key}.latent.npy` (the autoencoder posterior's mean and log-variance, (2C, h, w)),
`{key}.text.npy` (the CLIP text encoder's states, (T, D)) and `{key}.txt`; with `keep_images`, the image too.
UNet training on these skips both encoders (MosaicML measured ≈1.4× on SD; `bench/train_ldm.py` ours).

Where the Ray cluster has GPUs, each actor takes one (`device=auto`) and encodes in bf16 autocast
(`precision=auto`); the arrays are stored in `dtype` either way. The manifest's `fingerprints` name the VAE,
text encoder and tokenizer the cache was made with (`training.diffusion.cache_check`); they are part of the
stage's identity, and `task=ldm` refuses a cache whose fingerprints are not those of its `vae=` and `clip=`.

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
from pipeline.options import COUNT, RAY, STAGE_FLAGS, Option, check_options
from pipeline.stage import Finished, Run, Stage, drive
from pipeline.storage import MANIFEST, Location, config_fingerprint
from pipeline.tar_io import TarSampleWriter, iter_tar_samples

# Not part of the identity: where and how fast the stage runs (`device` among them: it moves no stored value).
# `precision` is part of it, as bf16 latents differ from fp32 ones in their low bits; `auto` is one identity
# wherever it resolves, on a cluster with GPUs or without.
RUN_ONLY = {"output", "processes", "overwrite", "wait_for_lock", "progress", "ray", "batch_size", "device"}
OPTIONS = (
    Option("batch_size", **COUNT),
    Option("image_size", **COUNT),
    Option("processes", nullable=True, **COUNT),
    Option("threads_per_actor", **COUNT),
    Option("keep_images", bool),
    *STAGE_FLAGS,
    RAY,
)
DTYPES = {"float32": np.float32, "float16": np.float16}
DEVICES, PRECISIONS = ("auto", "cpu", "cuda"), ("auto", "bf16", "fp32")


def resolve_device(device: str, precision: str, gpus: float) -> tuple[str, str]:
    """(device, precision) for the actors, given the GPUs the Ray cluster offers: auto takes a GPU when there is
    one, and bf16 there (fp32 on CPU: the numbers the stage always wrote there)."""
    if device == "cuda" and not gpus:
        raise StageError("encode: device=cuda but the Ray cluster offers no GPU; pass device=auto or device=cpu")
    device = device if device != "auto" else ("cuda" if gpus else "cpu")
    return device, precision if precision != "auto" else ("bf16" if device == "cuda" else "fp32")


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


class ShardEncoder:
    """Loads the frozen encoders once per actor, on `cfg["device"]` (resolved: cpu or cuda); each call encodes
    one shard (a batch of one row)."""

    def __init__(self, cfg: dict):
        import torch

        from training.data.transforms import EvalTransform
        from training.diffusion.autoencoder import SYMMETRIC_MEAN, SYMMETRIC_STD, load_vae
        from training.diffusion.cache_check import encoder_fingerprints
        from training.diffusion.unet import load_text_encoder

        torch.set_num_threads(max(1, int(cfg.get("threads_per_actor") or 1)))
        self.cfg, self.torch = cfg, torch
        self.device, self.bf16 = torch.device(cfg["device"]), cfg["precision"] == "bf16"
        self.vae = load_vae(cfg["vae"])
        self.text_encoder, self.tokenizer = load_text_encoder(cfg["clip"])
        # The folders could have been re-exported since the driver hashed them: the manifest must not lie.
        expected = cfg.get("fingerprints")
        if expected and encoder_fingerprints(self.vae, self.text_encoder, self.tokenizer) != expected:
            raise StageError(f"vae={cfg['vae']} or clip={cfg['clip']} changed while encoding; rerun the stage")
        self.vae.to(self.device), self.text_encoder.to(self.device)
        # Short side resized, centre square: the aspect-preserving crop task=ldm trains on (ShortSideCrop, random
        # there), so cached and on-the-fly latents come from pictures cut alike.
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

    def encode_batch(self, pixels, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(posterior moments (B, 2C, h, w), text states (B, T, D)) as float32, from pixels in [-1, 1]."""
        from training.diffusion.unet import encode_text

        torch = self.torch
        # Autocast, not a bf16 copy of the weights: GroupNorm, LayerNorm and softmax stay in fp32.
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            moments = self.vae.encode(pixels.to(self.device)).latent_dist.parameters
            states = encode_text(self.text_encoder, self.tokenizer, captions)
        return moments.float().cpu().numpy(), states.float().cpu().numpy()

    def _encode(self, items: list, writer: TarSampleWriter) -> None:
        moments, states = self.encode_batch(
            self.torch.stack([i["pixels"] for i in items]), [i["caption"] for i in items]
        )
        for item, latent, text in zip(items, moments, states):
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
        encoded_with = f"{self.device.type}/{self.cfg['precision']}"
        return {"shard": name, "samples": written, "sha256": sha, "errors": errors, "encoded_with": encoded_with}


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
        for key, allowed in (("device", DEVICES), ("precision", PRECISIONS)):
            cfg.setdefault(key, "auto")
            if cfg[key] not in allowed:
                raise StageError(f"encode: {key}={cfg[key]!r}; expected {', '.join(allowed[:-1])} or {allowed[-1]}")
        from training.diffusion.autoencoder import load_vae, vae_folder
        from training.diffusion.cache_check import encoder_fingerprints
        from training.diffusion.unet import load_text_encoder, require_text_encoder_folder

        vae_folder(cfg["vae"]), require_text_encoder_folder(cfg["clip"])  # a bad folder fails here, before Ray starts
        # The driver loads the models too, once, for their fingerprints: the identity names the models, not only
        # their folders, so a different VAE exported into the same folder is a different cache.
        self.fingerprints = encoder_fingerprints(load_vae(cfg["vae"]), *load_text_encoder(cfg["clip"]))
        source = Location(cfg["input"])
        self.shards = _input_shards(source)
        self.source_hash = source.read_json(MANIFEST)["content_hash"] if source.exists(MANIFEST) else None
        self.identity = config_fingerprint(
            {
                "config": {k: v for k, v in cfg.items() if k not in RUN_ONLY},
                "input": self.source_hash,
                "shards": self.shards,
                "fingerprints": self.fingerprints,
            }
        )
        self.cfg, self.output = cfg, Location(cfg["output"])

    def plan(self, work: Location) -> dict:
        return {"units": list(self.shards)}

    def _placement(self) -> tuple[str, str, float]:
        """(device, precision, GPUs in the cluster): a GPU per actor when the cluster has them (device=auto)."""
        import ray

        gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
        return (*resolve_device(self.cfg["device"], self.cfg["precision"], gpus), gpus)

    def worker(self, retry: bool) -> tuple[type, dict]:
        device, precision, _ = self._placement()
        return ShardEncoder, {
            "cfg": {**self.cfg, "device": device, "precision": precision, "fingerprints": self.fingerprints}
        }

    def resources(self) -> tuple[dict, int | None]:
        device, _, gpus = self._placement()
        if device != "cuda":
            return {"num_cpus": 1}, None
        return {"num_cpus": 1, "num_gpus": 1}, self.cfg.get("processes") or max(1, int(gpus))  # one per GPU

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
        extra = {
            "input_content_hash": self.source_hash,
            "fingerprints": self.fingerprints,
            "encoded_with": sorted({d.get("encoded_with", "unrecorded") for d in done}),  # device/precision
        }
        return Finished(counts, hashes, extra, summary)


def encode(cfg: DictConfig | dict) -> dict:
    """Run the encode stage; returns its manifest."""
    cfg = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    check_options("encode", cfg, OPTIONS)
    return drive(EncodeStage(cfg))
