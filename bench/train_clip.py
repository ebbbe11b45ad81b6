"""CLIP training throughput, side by side in one run (`make bench-train`, or `python bench/train_clip.py`):

1. samples/s of our Lightning training vs a bare PyTorch loop doing the same work (same model, batch,
   loss, AdamW, schedule, clipping), both fed the same batches from memory, so only the framework differs;
2. samples/s our data loader delivers (decode, crop, tokenise; from world shards) vs what a training step
   consumes: the loader must stay well ahead;
3. with a GPU: model FLOPs utilisation of the ViT-B/32 config in bf16 (FLOPs counted by Lightning's
   `measure_flops`, peak from its device table).
"""

from __future__ import annotations

import argparse
import os
import shutil
import time

import pytorch_lightning as pl
import torch
from curate import ROOT, config, make_raw  # bench/ is the script's folder
from hydra.utils import instantiate


def build(model: str, captions: list[str], context: int = 32):
    from training.clip.losses import ClipLoss
    from training.clip.model import ContrastiveClip
    from training.tokenizer import train_tokenizer

    cfg = config("train", f"model={model}")
    tokenizer = train_tokenizer(captions, vocab_size=1000, max_length=int(cfg.model.text.max_position_embeddings))
    return ContrastiveClip(instantiate(cfg.model, tokenizer=tokenizer)), ClipLoss(), tokenizer, cfg


def batches_in_memory(datamodule, count: int) -> list[dict]:
    iterator = iter(datamodule.train_dataloader())
    return [next(iterator) for _ in range(count)]


def bare_loop(net, loss_fn, batches, warmup: int, device, precision) -> float:
    """The same recipe written out by hand: forward, loss, backward, clip, AdamW step, schedule, clamp."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    from training.task_module import decay_groups

    net.to(device).train()
    optimizer = torch.optim.AdamW(decay_groups(net, 0.2), lr=5e-4, betas=(0.9, 0.98), eps=1e-6)
    schedule = get_cosine_with_min_lr_schedule_with_warmup(optimizer, 10, len(batches), min_lr_rate=0.0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    for step, batch in enumerate(batches):
        if step == warmup:
            sync(device)
            start = time.perf_counter()
        with autocast:
            image, text, scale, bias = net(
                *(batch[k].to(device) for k in ("pixel_values", "input_ids", "attention_mask"))
            )
        loss = loss_fn(image.float(), text.float(), scale.float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            net.clip.logit_scale.clamp_(0, 4.6052)
        float(loss)  # Lightning reads the loss every step for its bar and logs; so do we
    sync(device)
    return (len(batches) - warmup) * batches[0]["pixel_values"].shape[0] / (time.perf_counter() - start)


class StepTimer(pl.Callback):
    def __init__(self, warmup: int):
        self.warmup, self.start = warmup, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.warmup and self.start is None:
            sync(pl_module.device)
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        sync(pl_module.device)
        self.seconds = time.perf_counter() - self.start


def lightning_loop(net, loss_fn, batches, warmup: int, accelerator: str, precision: str) -> float:
    from training.clip.module import ClipTraining

    module = ClipTraining(
        net,
        loss_fn,
        optimizer=lambda groups: torch.optim.AdamW(groups, lr=5e-4, betas=(0.9, 0.98), eps=1e-6),
        warmup_steps=10,
    )
    timer = StepTimer(warmup)
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=1,
        max_steps=len(batches),
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
        log_every_n_steps=10,
    )
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    return (len(batches) - warmup) * batches[0]["pixel_values"].shape[0] / timer.seconds


def loader_rate(datamodule, batches: int) -> float:
    iterator = iter(datamodule.train_dataloader())
    next(iterator)  # workers started
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * datamodule.batch_size / (time.perf_counter() - start)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def mfu(batch_size: int, steps: int, captions: list[str]) -> tuple[float, float]:
    """(samples/s, MFU) of ViT-B/32 in bf16 on the GPU, on random inputs (data is not the question here)."""
    from lightning_fabric.utilities.throughput import get_available_flops, measure_flops

    net, loss_fn, tokenizer, cfg = build("clip_vit_b32", captions)
    size, context = int(cfg.model.image_size), int(cfg.model.text.max_position_embeddings)
    with torch.device("meta"):
        meta_net, _, _, _ = build("clip_vit_b32", captions)
        args = (
            torch.randn(batch_size, 3, size, size),
            torch.randint(4, 900, (batch_size, context)),
            torch.ones(batch_size, context, dtype=torch.long),
        )
        flops = measure_flops(meta_net, lambda: meta_net(*args), loss_fn=lambda out: out[0].sum() + out[1].sum())
    device = torch.device("cuda")
    batch = {
        "pixel_values": torch.randn(batch_size, 3, size, size),
        "input_ids": torch.randint(4, 900, (batch_size, context)),
        "attention_mask": torch.ones(batch_size, context, dtype=torch.long),
    }
    rate = bare_loop(net, loss_fn, [batch] * steps, warmup=5, device=device, precision="bf16-mixed")
    peak = get_available_flops(device, torch.bfloat16)
    return rate, flops * rate / batch_size / peak


def main() -> None:
    from training.data.datamodule import ShardDataModule

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="clip_small")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "out", "train_clip"))
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    torch.manual_seed(0)
    print(f"writing {args.samples} world samples as shards …", flush=True)
    captions = make_raw(os.path.join(args.out, "shards"), args.samples, 256)
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    precision = "bf16-mixed" if gpu else "32-true"

    net, loss_fn, tokenizer, cfg = build(args.model, captions)
    datamodule = ShardDataModule(
        os.path.join(args.out, "shards"),
        batch_size=args.batch,
        num_workers=2,
        resampled=True,
        epoch_samples=args.batch * (4 * args.steps + 10),
    )
    datamodule.attach(tokenizer, int(cfg.model.image_size), int(cfg.model.text.max_position_embeddings))
    batches = batches_in_memory(datamodule, args.steps)
    warmup = min(5, args.steps // 3)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    bare, ours = [], []
    for _ in range(args.repeats):  # interleaved, best of each: CPU timings drift between runs
        net.load_state_dict(state)
        bare.append(bare_loop(net, loss_fn, batches, warmup, device, precision))
        net.load_state_dict(state)
        ours.append(lightning_loop(net, loss_fn, batches, warmup, "gpu" if gpu else "cpu", precision))
    bare, ours = max(bare), max(ours)
    loader = loader_rate(datamodule, 3 * args.steps)  # well past the batches the workers prefetch

    rows = [
        ("bare PyTorch loop", f"{bare:.1f}", "1.00"),
        ("Lightning (ClipTraining)", f"{ours:.1f}", f"{ours / bare:.2f}"),
        ("data loader, 2 workers", f"{loader:.1f}", f"{loader / ours:.2f}× what a step consumes"),
    ]
    print(
        f"\nCLIP training, model={args.model}, batch {args.batch}, {args.steps} steps ({warmup} warm-up), "
        f"{device.type}, "
        f"{precision}, best of {args.repeats}"
    )
    print(f"{'':<26}{'samples/s':>12}  ratio")
    for name, rate, ratio in rows:
        print(f"{name:<26}{rate:>12}  {ratio}")
    print(
        f"Lightning overhead: {100 * (1 - ours / bare):.1f}% (target ≤ 5%); loader headroom {loader / ours:.1f}× "
        f"(target ≥ 3×)"
    )
    if gpu:
        rate, utilisation = mfu(256, 30, captions)
        print(
            f"ViT-B/32 bf16, batch 256 on {torch.cuda.get_device_name()}: {rate:.0f} samples/s, MFU "
            f"{100 * utilisation:.1f}%"
        )
    else:
        print("no GPU here: MFU of ViT-B/32 in bf16 is measured when one is lent")


if __name__ == "__main__":
    main()
