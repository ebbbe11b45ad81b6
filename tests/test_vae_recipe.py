"""The autoencoder recipe of Stable Diffusion's KL-f8: L1 + a perceptual term + KL + a PatchGAN whose weight is
adaptive (taming's λ), measured at the decoder's last layer; the SSIM term and metric; LPIPS from local weights
only; a short training run that logs λ, the gradient ratio, val/ssim and val/sharpness."""

from __future__ import annotations

import subprocess
import sys
import types

import mlflow
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from pipeline.world.shards import write_world_shards
from support import CONF, ROOT, stage_config, subprocess_env
from training.diffusion.autoencoder import edge_sharpness
from training.diffusion.autoencoder_module import VaeTraining, hard_pixel_l1
from training.diffusion.perceptual import LpipsLoss, StructuralLoss, fitted_window, ssim
from training.errors import UserError
from training.train import train


def _module(factor: float = 0.5, adaptive: bool = True, perceptual=None) -> VaeTraining:
    torch.manual_seed(0)
    vae = instantiate(OmegaConf.load(CONF / "model" / "vae_tiny.yaml"))
    return VaeTraining(
        vae,
        optimizer=torch.optim.AdamW,
        perceptual=perceptual if perceptual is not None else StructuralLoss(),
        discriminator={"channels": 16, "layers": 3},
        discriminator_start=0,
        discriminator_weight=factor,
        adaptive_discriminator_weight=adaptive,
    )


def _pictures(n: int = 4, side: int = 32) -> torch.Tensor:
    """Flat backgrounds with a bright square: edges for the discriminator and SSIM to see. (B, 3, S, S) in [-1, 1]."""
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(n, 3, 1, 1, generator=generator).expand(n, 3, side, side).clone() * 2 - 1
    images[:, :, side // 4 : side // 2, side // 4 : side // 2] = 0.9
    return images


def _conv_out_grad(module: VaeTraining, loss: torch.Tensor) -> torch.Tensor:
    return torch.autograd.grad(loss, module.vae.decoder.conv_out.weight, retain_graph=True)[0]


@pytest.mark.parametrize("factor", [0.5, 0.1])
def test_adaptive_weight_holds_the_adversarial_gradient_at_the_configured_fraction(factor):
    module = _module(factor)
    terms = module.generator_losses(_pictures(), adversarial_on=True)
    reconstruction = _conv_out_grad(module, terms["reconstruction"]).norm()
    adversarial = _conv_out_grad(module, terms["adversarial_weight"] * terms["generator_adversarial"]).norm()
    measured = float(adversarial / reconstruction)
    print(f"factor {factor}: raw ratio {float(terms['adversarial_ratio']):.2f}, weighted ratio {measured:.4f}")
    assert measured == pytest.approx(factor, rel=1e-2)
    # λ is the factor times the inverse of the raw ratio, and it carries no gradient of its own.
    assert float(terms["adversarial_weight"]) == pytest.approx(factor / float(terms["adversarial_ratio"]), rel=1e-2)
    assert not terms["adversarial_weight"].requires_grad


def test_a_fixed_weight_leaves_the_adversarial_gradient_at_whatever_it_is():
    module = _module(0.5, adaptive=False)
    terms = module.generator_losses(_pictures(), adversarial_on=True)
    reconstruction = _conv_out_grad(module, terms["reconstruction"]).norm()
    adversarial = _conv_out_grad(module, terms["adversarial_weight"] * terms["generator_adversarial"]).norm()
    assert float(terms["adversarial_weight"]) == 0.5 and "adversarial_ratio" not in terms
    assert float(adversarial / reconstruction) != pytest.approx(0.5, rel=0.1)  # not held at the factor


def test_before_the_start_the_terms_weigh_nothing_yet_every_parameter_gets_a_gradient():
    module = _module()
    pixels = _pictures()
    torch.manual_seed(2)  # the posterior sample: the same draw in both calls
    before = module.generator_losses(pixels, adversarial_on=False)
    expected = before["reconstruction"] + module.kl_weight * before["kl"]
    assert float(before["loss"].detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    before["loss"].backward()  # DDP needs every parameter in the graph on every step, the discriminator's too
    missing = [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    assert all(float(p.grad.abs().sum()) == 0 for p in module.discriminator.parameters())


def test_ssim_term_and_metric_on_hand_made_cases():
    pictures = _pictures()
    assert float(ssim(pictures, pictures)) == pytest.approx(1.0, abs=1e-5)
    loss = StructuralLoss()
    blurred = F.avg_pool2d(pictures, 3, 1, 1, count_include_pad=False)
    assert float(loss(pictures, pictures)) == pytest.approx(0.0, abs=1e-5) and float(loss(blurred, pictures)) > 0.01
    # MS-SSIM only where its 4 halvings leave a whole window: over 160 px at window 11, not on 32–64 px images.
    assert not loss.uses_multiscale(64) and loss.uses_multiscale(192)
    large = _pictures(2, 192)
    assert 0 < float(loss(F.avg_pool2d(large, 5, 1, 2, count_include_pad=False), large)) < 1
    assert fitted_window(8, 11) == 7 and fitted_window(32, 11) == 11  # tiny test images still get a window
    noisy = (pictures + 0.3 * torch.randn_like(pictures)).clamp(-1, 1)
    assert float(edge_sharpness(blurred, pictures)) < 0.9 < 1.1 < float(edge_sharpness(noisy, pictures))
    assert float(edge_sharpness(pictures, pictures)) == pytest.approx(1.0)
    reconstruction = blurred.clone().requires_grad_(True)
    loss(reconstruction, pictures).backward()
    assert torch.isfinite(reconstruction.grad).all() and reconstruction.grad.abs().sum() > 0


def test_lpips_needs_its_package_and_a_local_weights_file(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lpips", None)  # as if not installed
    with pytest.raises(UserError, match=r"needs the lpips package \(pip install lpips\)"):
        LpipsLoss(str(tmp_path / "vgg.pth"))

    class FakeLpips(torch.nn.Module):  # the package's constructor, without its backbone
        def __init__(self, net, pretrained, pnet_rand, verbose):
            super().__init__()
            assert not pretrained and pnet_rand  # nothing may be fetched
            self.lin = torch.nn.Conv2d(3, 1, 1, bias=False)

        def forward(self, x, y):
            return self.lin(x - y).abs().mean((1, 2, 3), keepdim=True)

    monkeypatch.setitem(sys.modules, "lpips", types.SimpleNamespace(LPIPS=FakeLpips))
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(UserError, match=f"module.perceptual.weights={missing} is not a file"):
        LpipsLoss(str(missing))
    torch.manual_seed(3)
    saved = FakeLpips("vgg", False, True, False).state_dict()
    torch.save(saved, tmp_path / "lpips_vgg.pth")
    loss = LpipsLoss(str(tmp_path / "lpips_vgg.pth"))
    assert torch.equal(loss.model.lin.weight, saved["lin.weight"])  # the file's weights, frozen
    assert not any(p.requires_grad for p in loss.parameters())
    assert float(loss(_pictures(), _pictures())) == 0.0


def test_a_short_run_logs_the_adaptive_weight_and_validation_ssim(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    shards = write_world_shards(tmp_path / "shards", 48, 16, image_size=32)
    train(
        stage_config(
            "train",
            "task=vae",
            f"data.path={shards}",
            f"output={tmp_path}/run",
            "data.batch_size=8",
            "data.val_shards=1",
            "data.num_workers=0",
            "trainer.max_steps=4",
            "trainer.log_every_n_steps=1",
            "trainer.enable_progress_bar=false",
            "module.discriminator_start=2",
            "checkpoint_every=1000",
        )
    )
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("pixelmill-vae").experiment_id])

    def history(name: str) -> dict[int, float]:
        return {m.step: m.value for m in client.get_metric_history(run.info.run_id, name)}

    weights, ratios = history("train/adversarial_weight"), history("train/adversarial_grad_ratio")
    # Before discriminator_start its passes are skipped: neither a weight nor a ratio is logged.
    assert set(ratios) == set(weights) == {2, 3} and all(w > 0 for w in weights.values())
    assert all(weights[s] == pytest.approx(0.5 / ratios[s], rel=1e-2) for s in ratios)
    assert run.data.metrics["val/ssim"] <= 1 and 0 < run.data.metrics["val/sharpness"]
    assert "train/perceptual" in run.data.metrics


@pytest.mark.slow
def test_ddp_runs_the_adaptive_weight_on_each_rank(tmp_path):
    """Two gloo processes through the discriminator's start: λ's autograd.grad before Lightning's backward
    must leave DDP's reducer (every parameter used, gradients reduced once) as it expects."""
    shards = write_world_shards(tmp_path / "shards", 32, 8, image_size=32)
    command = [sys.executable, "-m", "training.train", "task=vae", "trainer=ddp", f"data.path={shards}"]
    result = subprocess.run(
        [
            *command,
            f"output={tmp_path}/run",
            f"hydra.run.dir={tmp_path}/hydra",
            "data.batch_size=4",
            "data.num_workers=0",
            "trainer.max_steps=4",
            "trainer.enable_progress_bar=false",
            "module.discriminator_start=2",
            "checkpoint_every=1000",
            "tracking=false",
        ],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 4, 2 process(es)" in result.stdout


@pytest.mark.parametrize("side", [2, 4, 8])
def test_hard_pixels_weigh_a_small_object_whatever_its_area(side):
    """A wrong object of side² pixels on a right background: its share of the per-pixel mean shrinks with its area,
    the hard-pixel term (worst 5% of pixels) stays the object's own error while the object fits in those 5%."""
    pixels = torch.zeros(2, 3, 32, 32)
    reconstruction = pixels.clone()
    reconstruction[:, :, :side, :side] = 0.8  # the object comes back wrong by 0.8 per channel
    error = (reconstruction - pixels).abs()
    area = side * side / 1024
    assert float(error.mean()) == pytest.approx(0.8 * area)
    hard = float(hard_pixel_l1(error, 0.05))
    expected = 0.8 * min(1.0, side * side / round(0.05 * 1024))  # 51 hardest pixels: the object, then zeros
    assert hard == pytest.approx(expected, rel=1e-5)
    if side <= 4:
        assert hard / float(error.mean()) > 15  # a 4×4 object weighs ≥ 20× its area's share


def test_hard_pixel_term_adds_to_the_reconstruction_loss_and_refuses_a_bad_fraction():
    plain, hard = _module(), _module()
    hard.hard_pixel_fraction, hard.hard_pixel_weight = 0.05, 3.0
    torch.manual_seed(2)
    terms = {name: m.reconstruction_terms(m.reconstruct(_pictures())[0], _pictures()) for name, m in
             (("plain", plain), ("hard", hard))}  # fmt: skip
    assert "hard_pixels" not in terms["plain"]
    extra = terms["hard"]["reconstruction"] - terms["hard"]["l1"] - terms["hard"]["perceptual"]
    assert float(extra) == pytest.approx(3.0 * float(terms["hard"]["hard_pixels"]), rel=1e-5)
    assert float(terms["hard"]["hard_pixels"]) > float(terms["hard"]["l1"])
    vae = instantiate(OmegaConf.load(CONF / "model" / "vae_tiny.yaml"))
    with pytest.raises(UserError, match="hard_pixel_fraction=1.5"):
        VaeTraining(vae, optimizer=torch.optim.AdamW, hard_pixel_fraction=1.5)


def test_task_default_is_the_sd_recipe_and_the_demo_keeps_its_perceptual_term():
    task = stage_config("train", "task=vae", "data.path=shards", "output=out").module
    assert task.perceptual._target_.endswith("StructuralLoss") and task.discriminator is not None
    assert task.adaptive_discriminator_weight and task.discriminator_weight == 0.5
    demo = stage_config("train", "+experiment=demo_vae", "data.path=shards", "output=out").module
    assert demo.perceptual._target_.endswith("StructuralLoss") and demo.discriminator is None
    assert task.hard_pixel_fraction == 0 and demo.hard_pixel_fraction == 0.05  # SD's recipe; the world's objects
