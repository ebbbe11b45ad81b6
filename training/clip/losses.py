"""Contrastive losses for CLIP: softmax (InfoNCE, both directions) and SigLIP's pairwise sigmoid.

Across ranks, features are all-gathered *with* gradient (`torch.distributed.nn.all_gather`), so every rank's
encoders get the gradient of the loss over the global batch. With `local_loss`, a rank scores only its own
rows against the global batch (N_local × N logits instead of N × N): the same loss and gradients once DDP
averages over ranks, at a fraction of the memory. Without gradient through the gather, the other ranks'
features are constants (open_clip's `gather_with_grad=False`): cheaper, a slightly different gradient.
Both losses take normalised features (N_local, D) and the temperature as a log-scale parameter.

Hard negative captions (NegCLIP; `training.data.caption_negatives`): each sample may bring k more texts, its
caption with a word swapped, each with a flag saying whether it is real. Gathered like the true captions, they
are extra columns for the images only: every image is scored against the global batch's true captions and
its valid negatives (softmax: N_local × (1 + k)·N logits, invalid columns −inf; SigLIP: more pairs labelled
−1). The text-to-image direction is unchanged.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.nn.functional import all_gather as all_gather_with_grad


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_features(features: torch.Tensor, with_grad: bool) -> torch.Tensor:
    """(N_local, D) on each rank → (world · N_local, D), in rank order."""
    rank, world = _world()
    if world == 1:
        return features
    if with_grad:
        return torch.cat(all_gather_with_grad(features), dim=0)
    parts = [torch.empty_like(features) for _ in range(world)]
    dist.all_gather(parts, features.detach())
    parts[rank] = features  # the local part keeps its gradient
    return torch.cat(parts, dim=0)


def gather_flags(flags: torch.Tensor) -> torch.Tensor:
    """(N_local,) booleans on each rank → (world · N_local,), in rank order (no gradient to carry)."""
    _, world = _world()
    if world == 1:
        return flags
    parts = [torch.empty_like(flags) for _ in range(world)]
    dist.all_gather(parts, flags.contiguous())
    return torch.cat(parts, dim=0)


def negative_logits(
    image: torch.Tensor, negative_text: torch.Tensor, negative_valid: torch.Tensor, with_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unscaled similarities of `image` (M, D) to the global batch's hard negative captions, (M, N), and
    which of those columns are real negatives, (N,)."""
    all_negative = gather_features(negative_text, with_grad)
    valid = gather_flags(negative_valid.to(device=image.device, dtype=torch.bool))
    return image @ all_negative.T, valid


class ClipLoss(nn.Module):
    """Symmetric cross-entropy over image–text similarities, scaled by exp(logit_scale) (clamped to 100)."""

    def __init__(self, local_loss: bool = True, gather_with_grad: bool = True, max_logit_scale: float = 100.0):
        super().__init__()
        self.local_loss, self.gather_with_grad = bool(local_loss), bool(gather_with_grad)
        self.max_log_scale = float(torch.log(torch.tensor(max_logit_scale)))

    def forward(
        self,
        image: torch.Tensor,
        text: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
        negative_text: torch.Tensor | None = None,
        negative_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        rank, world = _world()
        scale = logit_scale.clamp(max=self.max_log_scale).exp()
        all_image = gather_features(image, self.gather_with_grad)
        all_text = gather_features(text, self.gather_with_grad)
        if self.local_loss:  # rows: this rank's samples; columns: everyone's
            rows = image
            logits_image = scale * image @ all_text.T  # (N_local, N)
            logits_text = scale * text @ all_image.T
            labels = torch.arange(image.shape[0], device=image.device) + rank * image.shape[0]
        else:  # the full N × N matrix on every rank; DDP's average of identical losses is the same loss
            rows = all_image
            logits_image = scale * all_image @ all_text.T  # (N, N)
            logits_text = logits_image.T
            labels = torch.arange(all_image.shape[0], device=image.device)
        if negative_text is not None:
            similarity, valid = negative_logits(rows, negative_text, negative_valid, self.gather_with_grad)
            masked = (scale * similarity).masked_fill(~valid, float("-inf"))
            logits_image = torch.cat([logits_image, masked], dim=1)
        return (F.cross_entropy(logits_image, labels) + F.cross_entropy(logits_text, labels)) / 2


class SigLipLoss(nn.Module):
    """SigLIP (Zhai et al. 2023): every image–text pair is a binary problem, label +1 on the diagonal and −1
    elsewhere: loss = −Σ_ij log σ(z_ij · (t · x_i·y_j + b)) / N. Each rank scores its own images against all
    texts and divides by its own batch; the mean over ranks (what DDP's gradient average takes) is the loss."""

    def __init__(
        self,
        gather_with_grad: bool = True,
        max_logit_scale: float = 100.0,
        init_logit_scale: float = 2.302585,
        init_logit_bias: float = -10.0,
    ):
        super().__init__()
        self.gather_with_grad = bool(gather_with_grad)
        # The paper's start (t = 10, b = −10): a fresh model gets these parameters; a loaded one keeps its t.
        self.init_logit_scale, self.init_logit_bias = float(init_logit_scale), float(init_logit_bias)
        self.max_log_scale = float(torch.log(torch.tensor(max_logit_scale)))

    def forward(
        self,
        image: torch.Tensor,
        text: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
        negative_text: torch.Tensor | None = None,
        negative_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        rank, _ = _world()
        all_text = gather_features(text, self.gather_with_grad)
        scale = logit_scale.clamp(max=self.max_log_scale).exp()
        bias = logit_bias if logit_bias is not None else 0.0
        logits = scale * image @ all_text.T + bias  # (N_local, N)
        n_local = image.shape[0]
        signs = -torch.ones_like(logits)
        signs[torch.arange(n_local), torch.arange(n_local) + rank * n_local] = 1.0
        loss = -F.logsigmoid(signs * logits).sum()
        if negative_text is not None:  # more pairs labelled −1: every image against every valid hard negative
            similarity, valid = negative_logits(image, negative_text, negative_valid, self.gather_with_grad)
            loss = loss - (F.logsigmoid(-(scale * similarity + bias)) * valid).sum()
        return loss / n_local
