"""Contrastive accumulation (`module.accum_freq`): k micro-batches give the gradient and the loss of the whole
batch (where averaging k small-batch losses does not), also over 2 FSDP2 processes whose gradients are
synchronised once, and a run with accum_freq=2 follows the accum_freq=1 run step for step through Lightning."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hydra.utils import instantiate
from omegaconf import OmegaConf

from pipeline.world.shards import write_world_shards
from support import CONF, stage_config
from training.clip.losses import ClipLoss, SigLipLoss
from training.clip.model import ContrastiveClip
from training.clip.module import ClipTraining
from training.errors import UserError
from training.parallelize import parallelize
from training.tokenizer import train_tokenizer
from training.train import train

K, B = 4, 8  # micro-batches per step, samples per micro-batch


def _module(loss, bias: float | None):
    """(ClipTraining over clip_tiny, its tokenizer): random weights fixed by the seed, no dropout, plain SGD."""
    words = ["red", "blue", "green", "cube", "ball", "grey", "white", "on", "a", "background"]
    tokenizer = train_tokenizer([" ".join(words[i:] + words[:i]) for i in range(len(words))], 300, max_length=32)
    torch.manual_seed(0)
    clip = instantiate(OmegaConf.load(CONF / "model" / "clip_tiny.yaml"), tokenizer=tokenizer)
    net = ContrastiveClip(clip, logit_bias=bias)
    return ClipTraining(net, loss, partial(torch.optim.SGD, lr=0.1), accum_freq=K), tokenizer


def _batch(tokenizer, n: int) -> dict:
    g = torch.Generator().manual_seed(1)
    words = ["red", "blue", "green", "cube", "ball", "grey", "white", "on", "a", "background"]
    captions = [" ".join(words[i] for i in torch.randint(0, len(words), (5,), generator=g)) for _ in range(n)]
    tokens = tokenizer(captions, padding="max_length", truncation=True, max_length=32, return_tensors="pt")
    return {
        "pixel_values": torch.randn(n, 3, 32, 32, generator=g),
        "input_ids": tokens["input_ids"],
        "attention_mask": tokens["attention_mask"],
        "corrupt": torch.tensor(0),
    }


def _grads(module: ClipTraining) -> torch.Tensor:
    grads = torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])
    module.zero_grad(set_to_none=True)
    return grads


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("loss, bias", [(ClipLoss(), None), (SigLipLoss(), 0.0)], ids=["clip", "siglip"])
def test_k_micro_batches_give_the_gradient_and_loss_of_the_whole_batch(loss, bias):
    module, tokenizer = _module(loss, bias)
    batch = _batch(tokenizer, K * B)
    reference = module.loss(*module._features(batch))  # one batch of K·B: what accum_freq=1 computes
    reference.backward()
    big_temperature = module.net.clip.logit_scale.grad.clone()
    big = _grads(module)

    accumulated_loss, _, _ = module.accumulated_backward(batch, lambda loss: loss.backward())
    temperature = module.net.clip.logit_scale.grad.clone()
    accumulated = _grads(module)
    assert accumulated.numel() == big.numel()
    assert _relative(accumulated, big) <= 1e-5, _relative(accumulated, big)
    assert float(accumulated_loss) == pytest.approx(reference.item(), rel=1e-6)
    # The temperature alone, one number among ~10^5: the big batch's gradient, not K× it (open_clip's).
    assert float(temperature) == pytest.approx(float(big_temperature), rel=1e-5)

    # What plain gradient accumulation computes: the mean of K losses over B samples each (K× fewer negatives).
    for j in range(K):
        micro = {name: t[j * B : (j + 1) * B] for name, t in batch.items() if name != "corrupt"}
        (module.loss(*module._features(micro)) / K).backward()
    plain = _grads(module)
    assert _relative(plain, big) > 0.05, _relative(plain, big)  # so the check above can fail


def _fsdp_rank(rank: int, world: int, init: str, results: dict) -> None:
    """Half of the batch per process, the model sharded with FSDP2 as `configure_model` does."""
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.set_num_threads(1)  # two processes on two cores
    module, tokenizer = _module(ClipLoss(), None)
    n = K * B // world
    mine = {name: t[rank * n : (rank + 1) * n] for name, t in _batch(tokenizer, K * B).items() if name != "corrupt"}
    parallelize(module.net, list(module.net.clip._no_split_modules), mesh=init_device_mesh("cpu", (world,)))
    loss, logit_scale, _ = module.accumulated_backward(mine, lambda loss: loss.backward())
    dist.all_reduce(loss)  # what the log shows: the mean of the ranks' losses
    grads = torch.cat([p.grad.full_tensor().flatten() for p in module.parameters() if p.grad is not None])
    if rank == 0:
        results.update(loss=float(loss) / world, logit_scale=float(logit_scale), grads=grads)
    dist.barrier()  # neither process tears gloo down while the other still talks to it
    dist.destroy_process_group()


def test_fsdp2_processes_accumulate_the_gradient_of_the_global_batch(tmp_path):
    module, tokenizer = _module(ClipLoss(), None)
    reference = module.loss(*module._features(_batch(tokenizer, K * B)))
    reference.backward()
    big = _grads(module)
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_fsdp_rank, args=(2, f"file://{tmp_path}/rendezvous", results), nprocs=2, join=True)
        results = dict(results)
    assert results["loss"] == pytest.approx(reference.item(), rel=1e-6)
    assert _relative(results["grads"], big) <= 1e-5, _relative(results["grads"], big)
    # Read after backward, when FSDP2 has freed the unsharded parameters the temperature was a view of.
    assert results["logit_scale"] == pytest.approx(float(module.net.clip.logit_scale), rel=1e-6)


def test_a_batch_that_does_not_split_into_k_micro_batches_is_refused():
    module, tokenizer = _module(ClipLoss(), None)
    with pytest.raises(UserError, match="not a multiple of module.accum_freq=4"):
        module.accumulated_backward(_batch(tokenizer, 10), lambda loss: loss.backward())


def test_accum_freq_2_trains_through_lightning_like_accum_freq_1(tmp_path):
    """Same data, batch 16, 3 AdamW steps with clipping and warmup: accum_freq=2 (2 × 8 per pass, manual
    optimization) ends at the loss of accum_freq=1 (automatic), one optimizer step per batch."""
    shards = write_world_shards(tmp_path / "shards", 48, 48, image_size=32)
    common = [
        f"data.path={shards}",
        "data.batch_size=16",
        "data.num_workers=0",
        "data.shuffle_buffer=0",
        "data.crop_scale=[1,1]",
        "trainer.max_steps=3",
        "trainer.enable_progress_bar=false",
        "module.warmup_steps=1",
        "tracking=false",
    ]
    final = {}
    for k in (1, 2):
        out = tmp_path / f"k{k}"
        final[k] = train(stage_config("train", *common, f"module.accum_freq={k}", f"output={out}"))
        checkpoint = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)  # our own file
        assert checkpoint["global_step"] == 3  # optimizer steps, one per batch of 16
    assert math.isfinite(final[2]) and final[2] == pytest.approx(final[1], abs=1e-4), final

    with pytest.raises(UserError, match="do not combine"):
        train(
            stage_config(
                "train",
                *common,
                "module.accum_freq=2",
                "trainer.accumulate_grad_batches=2",
                f"output={tmp_path / 'both'}",
            )
        )
