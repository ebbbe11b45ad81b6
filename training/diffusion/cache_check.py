"""Which encoders a latent cache was made with, and the check that a `task=ldm` run is given the same ones.

A fingerprint is the first 16 hex digits of a sha256 over a model's class, its config (less bookkeeping) and
every state-dict tensor (name, dtype, shape, bytes, in name order), taken from the model as loaded, so a VAE
named by its own folder or by a pipeline folder's `vae/` hashes alike. The tokenizer's covers its vocabulary,
merges, normaliser and template (tokenizer.json as `tokenizers` serialises it) and its `model_max_length`.
`pipeline.encode` writes them to the cache's manifest under `fingerprints`; `check_cache` compares them with
the models a training run loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

import fsspec
import torch

from training.errors import UserError

log = logging.getLogger(__name__)
# Config keys that do not change what the encoders compute: versions and paths, and the VAE's latent scale,
# which the cache leaves out (it stores the posterior before scaling; training applies its own VAE's scale).
BOOKKEEPING = {"transformers_version", "architectures", "torch_dtype", "dtype", "scaling_factor", "shift_factor"}
NAMES = {"vae": "VAE", "text_encoder": "text encoder", "tokenizer": "tokenizer"}
OPTIONS = {"vae": "vae", "text_encoder": "clip", "tokenizer": "clip"}  # the option that names each model


def _digest(digest) -> str:
    return digest.hexdigest()[:16]


def model_fingerprint(model: torch.nn.Module) -> str:
    config = model.config
    config = config.to_diff_dict() if hasattr(config, "to_diff_dict") else dict(config)  # transformers, diffusers
    kept = {k: v for k, v in config.items() if not k.startswith("_") and k not in BOOKKEEPING}
    digest = hashlib.sha256(type(model).__name__.encode())
    digest.update(json.dumps(kept, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"\n{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(flat.view(torch.uint8).numpy().tobytes())  # raw bytes: any dtype, bf16 included
    return _digest(digest)


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        # Calling a fast tokenizer with padding or truncation leaves them set on its backend: not its identity.
        state.pop("padding", None), state.pop("truncation", None)
    else:
        state = {"class": type(tokenizer).__name__, "vocab": sorted(tokenizer.get_vocab().items())}
    state["model_max_length"] = int(tokenizer.model_max_length)
    return _digest(hashlib.sha256(json.dumps(state, sort_keys=True).encode()))


def encoder_fingerprints(vae, text_encoder, tokenizer) -> dict[str, str]:
    return {
        "vae": model_fingerprint(vae),
        "text_encoder": model_fingerprint(text_encoder),
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }


def cache_manifest(path: str) -> dict | None:
    """The manifest of the `pipeline.encode` output at `path` (its folder, or a brace pattern of its tars);
    None when the data is not such a cache."""
    fs, root = fsspec.core.url_to_fs(str(path))
    folder = root if fs.isdir(root) else os.path.dirname(root)
    name = f"{folder.rstrip('/')}/manifest.json"
    if not fs.exists(name):
        return None
    with fs.open(name, "r") as f:
        manifest = json.load(f)
    return manifest if manifest.get("stage") == "encode" else None


def check_cache(data_cfg, cfg, vae, text_encoder, tokenizer) -> None:
    """Refuse, in one line, training data cached with other encoders than `vae=` / `clip=` name. Image shards,
    and caches from before fingerprints were recorded (warned about), pass."""
    fingerprints = None
    for option in ("path", "val_path"):
        path = data_cfg.get(option)
        manifest = cache_manifest(path) if path else None
        if manifest is None:
            continue
        cached = manifest.get("fingerprints")
        if not cached:
            log.warning("data.%s=%s records no encoder fingerprints: cannot check its VAE and CLIP", option, path)
            continue
        fingerprints = fingerprints or encoder_fingerprints(vae, text_encoder, tokenizer)  # hashed once, if needed
        differ = [k for k in NAMES if k in cached and cached[k] != fingerprints[k]]
        if differ:
            made_from = manifest.get("config", {})
            what = "; ".join(
                f"{NAMES[k]} fingerprint {cached[k]} in the cache (made from {OPTIONS[k]}={made_from.get(OPTIONS[k])}),"
                f" {fingerprints[k]} for {OPTIONS[k]}={cfg.get(OPTIONS[k])}"
                for k in differ
            )
            raise UserError(
                f"data.{option}={path} was encoded with another {' and '.join(NAMES[k] for k in differ)}: {what}; "
                "re-encode it with these models (python -m pipeline.encode) or train with the ones it was made from"
            )
