"""Contrastive losses: over 2 real processes (gloo) the loss and gradients equal one process on the whole
batch, with and without hard negative captions; SigLIP and CLIP losses equal their formulas on hand-made
cases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from training.clip.losses import ClipLoss, SigLipLoss

N, D_IN, D = 6, 5, 4  # samples per rank, input width, embedding width


def _problem():
    """Two 'encoders' (linear maps), a batch of 2·N pairs and one hard negative caption per pair (every third
    one masked), the same in every process."""
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(D_IN, D, generator=g),
        torch.randn(D_IN, D, generator=g),
        torch.randn(2 * N, D_IN, generator=g),
        torch.randn(2 * N, D_IN, generator=g),
        torch.randn(2 * N, D_IN, generator=g),
        torch.arange(2 * N) % 3 != 0,
    )


def _loss_and_grads(loss_fn, x_img, x_txt, with_bias: bool, negatives=None):
    w_img, w_txt = _problem()[:2]
    params = [w_img.requires_grad_(), w_txt.requires_grad_(), torch.tensor(math.log(10.0), requires_grad=True)]
    bias = torch.tensor([-3.0], requires_grad=True) if with_bias else None
    image, text = F.normalize(x_img @ params[0], dim=-1), F.normalize(x_txt @ params[1], dim=-1)
    extra = () if negatives is None else (F.normalize(negatives[0] @ params[1], dim=-1), negatives[1])
    loss = loss_fn(image, text, params[2], bias, *extra)
    loss.backward()
    grads = [p.grad for p in params] + ([bias.grad] if with_bias else [])
    return loss.detach(), grads


def _cases():
    return {
        "clip_local": (ClipLoss(local_loss=True), False),
        "clip_full": (ClipLoss(local_loss=False), False),
        "siglip": (SigLipLoss(), True),
        "clip_local_negatives": (ClipLoss(local_loss=True), False),
        "clip_full_negatives": (ClipLoss(local_loss=False), False),
        "siglip_negatives": (SigLipLoss(), True),
        # Without gradient through the gather: the same loss; other ranks' features are constants, so the
        # gradients differ by design (open_clip's gather_with_grad=False) and only the loss is compared.
        "clip_local_no_grad_gather": (ClipLoss(local_loss=True, gather_with_grad=False), False),
        "clip_full_no_grad_gather": (ClipLoss(local_loss=False, gather_with_grad=False), False),
        "siglip_no_grad_gather": (SigLipLoss(gather_with_grad=False), True),
    }


def _rank(rank: int, world: int, init: str, results: dict) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    _, _, x_img, x_txt, x_neg, valid = _problem()
    mine = slice(rank * N, (rank + 1) * N)
    for name, (loss_fn, with_bias) in _cases().items():
        negatives = (x_neg[mine], valid[mine]) if name.endswith("negatives") else None
        loss, grads = _loss_and_grads(loss_fn, x_img[mine], x_txt[mine], with_bias, negatives)
        # What DDP does with them: average the losses for the log, the gradients for the step.
        dist.all_reduce(loss)
        for g in grads:
            dist.all_reduce(g)
        if rank == 0:
            results[name] = (loss / world, [g / world for g in grads])
    dist.barrier()  # neither process tears gloo down while the other still talks to it
    dist.destroy_process_group()


def test_distributed_losses_equal_the_single_process_loss_and_gradients(tmp_path):
    _, _, x_img, x_txt, x_neg, valid = _problem()
    single = {
        name: _loss_and_grads(fn, x_img, x_txt, bias, (x_neg, valid) if name.endswith("negatives") else None)
        for name, (fn, bias) in _cases().items()
    }
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank, args=(2, f"file://{tmp_path}/rendezvous", results), nprocs=2, join=True)
        results = dict(results)
    for name, (loss, grads) in single.items():
        d_loss, d_grads = results[name]
        assert abs(float(d_loss) - float(loss)) <= 1e-5, name
        if name.endswith("no_grad_gather"):
            assert all(torch.isfinite(dg).all() and dg.abs().sum() > 0 for dg in d_grads), name
            continue
        for g, dg in zip(grads, d_grads):
            assert (g - dg).abs().max() <= 1e-5, name
        assert sum(float(g.abs().sum()) for g in grads) > 0.1  # the gradients compared are not all zero
    for name in ("clip_local", "clip_full", "siglip"):  # the negatives change the loss: they are not ignored
        assert float(single[f"{name}_negatives"][0]) > float(single[name][0]) + 1e-3, name


def test_siglip_loss_matches_its_formula_on_a_hand_made_case():
    image = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    text = torch.tensor([[0.8, 0.6], [0.0, 1.0]])
    t, b = 2.0, -1.0
    loss = SigLipLoss()(image, text, torch.tensor(math.log(t)), torch.tensor([b]))
    # Similarities: x0·y0 = 0.8, x0·y1 = 0, x1·y0 = 0.96, x1·y1 = 0.8; +1 on the diagonal, −1 off it.
    sigmoid = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    by_hand = (
        -(
            math.log(sigmoid(t * 0.8 + b))
            + math.log(sigmoid(-(t * 0.0 + b)))
            + math.log(sigmoid(-(t * 0.96 + b)))
            + math.log(sigmoid(t * 0.8 + b))
        )
        / 2
    )
    assert float(loss) == pytest.approx(by_hand, abs=1e-6)


def test_clip_loss_matches_its_formula_and_clamps_the_temperature():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    scale = 3.0
    loss = ClipLoss()(image, text, torch.tensor(math.log(scale)))
    # Image→text rows: [0.6, 0], [0.8, 1]; text→image rows: [0.6, 0.8], [0, 1]; labels on the diagonal.
    ce = lambda logits, i: -logits[i] + math.log(sum(math.exp(v) for v in logits))  # noqa: E731
    by_hand = (ce([scale * 0.6, 0], 0) + ce([scale * 0.8, scale * 1], 1)) / 2
    by_hand = (by_hand + (ce([scale * 0.6, scale * 0.8], 0) + ce([0, scale * 1], 1)) / 2) / 2
    assert float(loss) == pytest.approx(by_hand, abs=1e-6)
    log_scale = torch.tensor(math.log(1000.0), requires_grad=True)
    clamped = ClipLoss()(image, text, log_scale)
    assert float(clamped.detach()) == pytest.approx(
        float(ClipLoss()(image, text, torch.tensor(math.log(100.0)))), abs=1e-6
    )
    clamped.backward()
    assert float(log_scale.grad) == 0.0  # beyond the clamp, no push further out
