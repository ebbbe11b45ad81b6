"""The perceptual term of the autoencoder's loss, beside L1: what keeps decodes from going blurry (an L1 or L2
optimum averages the plausible edges into a soft one; a structural or feature distance does not).

- `StructuralLoss`: 1 − SSIM, weight-free (nothing to download), the default. MS-SSIM over its 5 scales
  where the images are large enough for them, else single-scale SSIM (see `StructuralLoss`).
- `LpipsLoss`: LPIPS (Zhang et al. 2018), the term Stable Diffusion's KL autoencoder trained with, from a local
  weights file: its VGG/AlexNet backbone cannot be downloaded here.
Both take images in [-1, 1] and return a scalar to minimise. Each is chosen by `_target_` in the task config.
"""

from __future__ import annotations

import os

import torch
from pytorch_msssim import ms_ssim
from pytorch_msssim import ssim as _ssim
from torch import nn

from training.errors import UserError

DATA_RANGE = 2.0  # images in [-1, 1]: SSIM's stabilising constants are (K · range)²
MS_SSIM_DOWNSAMPLINGS = 4  # MS-SSIM's 5 scales halve the image 4 times


def fitted_window(side: int, window: int) -> int:
    """The Gaussian window, shrunk to the largest odd size the image holds (SSIM needs a whole window inside)."""
    fitted = min(int(window), int(side))
    return fitted if fitted % 2 else fitted - 1


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 11) -> torch.Tensor:
    """Mean SSIM (Wang et al. 2004; Gaussian window, σ = 1.5 at the usual 11 px) of images in [-1, 1]."""
    size = fitted_window(min(x.shape[-2:]), window)
    return _ssim(x, y, data_range=DATA_RANGE, win_size=size, win_sigma=1.5 * size / 11)


class StructuralLoss(nn.Module):
    """1 − MS-SSIM, or 1 − SSIM on small images.

    MS-SSIM compares structure at 5 scales, halving 4 times, and needs a whole window at the coarsest: a side
    over (window − 1) · 16 px (160 at the usual 11). The world's and the demo's images are 32–64 px, where the
    coarsest scales would be 2–4 px, so there it is single-scale SSIM with the window fitted to the image
    (`multiscale=false` forces that everywhere)."""

    def __init__(self, window: int = 11, multiscale: bool = True):
        super().__init__()
        self.window, self.multiscale = int(window), bool(multiscale)

    def uses_multiscale(self, side: int) -> bool:
        return self.multiscale and side > (self.window - 1) * 2**MS_SSIM_DOWNSAMPLINGS

    def forward(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        reconstruction, target = reconstruction.float(), target.float()
        if self.uses_multiscale(min(target.shape[-2:])):
            return 1 - ms_ssim(reconstruction, target, data_range=DATA_RANGE, win_size=self.window)
        return 1 - ssim(reconstruction, target, self.window)


class LpipsLoss(nn.Module):
    """LPIPS from a local file: the state dict of the `lpips` package's `LPIPS(net=net)` (backbone and linear
    heads, as `torch.save(lpips.LPIPS(net="vgg").state_dict(), path)` writes it on a machine with a network, or
    a .safetensors of the same). Frozen: it scores, it does not train. Needs `pip install lpips`."""

    def __init__(self, weights: str, net: str = "vgg"):
        super().__init__()
        try:
            import lpips
        except ImportError as error:  # lpips also needs torchvision for its backbone
            raise UserError(
                f"module.perceptual=LpipsLoss needs the lpips package (pip install lpips): {error}"
            ) from None
        if not weights or not os.path.isfile(str(weights)):
            raise UserError(
                f"module.perceptual.weights={weights} is not a file; expected the LPIPS({net}) state dict "
                "(or use training.diffusion.perceptual.StructuralLoss, which needs no weights)"
            )
        # pretrained=False and pnet_rand=True: build the network without fetching anything, then load the file.
        self.model = lpips.LPIPS(net=net, pretrained=False, pnet_rand=True, verbose=False)
        self.model.load_state_dict(_load_state(str(weights)))
        self.model.eval().requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.eval()  # the backbone's dropout stays off while the autoencoder trains
        return self

    def forward(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.model(reconstruction.float(), target.float()).mean()


def _load_state(path: str) -> dict:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)  # tensors only: nothing else is unpickled
