"""The formulas of the diffusion recipe against hand computation: EMA update and warmup, min-SNR-γ
weights for both prediction types, PSNR, the latent scale."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from training.diffusion.autoencoder import build_vae, latent_scale, psnr
from training.diffusion.unet import ema_decay, ema_update, min_snr_weights, noise_scheduler


def test_ema_update_is_the_convex_combination_and_its_warmup_follows_the_formula():
    torch.manual_seed(0)
    model, average = nn.Linear(3, 2), nn.Linear(3, 2)
    before = [p.detach().clone() for p in average.parameters()]
    ema_update(average, model, 0.9)
    for kept, old, current in zip(average.parameters(), before, model.parameters()):
        assert torch.allclose(kept, 0.9 * old + 0.1 * current, atol=1e-7)
    assert ema_decay(0, 0.9999) == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    assert ema_decay(90, 0.9999) == pytest.approx(91 / 100)
    assert ema_decay(10**6, 0.9999) == 0.9999  # capped by the configured decay
    assert ema_decay(0, 0.99, warmup=False) == 0.99
    ema_update(average, model, 0.0)  # decay 0: the average becomes the weights
    assert all(torch.equal(a, b) for a, b in zip(average.parameters(), model.parameters()))


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_min_snr_weights_match_the_formula(prediction):
    schedule = noise_scheduler(
        prediction, num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
    )
    steps = torch.tensor([0, 10, 250, 500, 999])
    alpha_bar = schedule.alphas_cumprod[steps].double()
    snr = alpha_bar / (1 - alpha_bar)  # SNR(t) = ᾱ / (1 − ᾱ)
    expected = snr.clamp(max=5.0) / (snr + 1 if prediction == "v_prediction" else snr)
    assert torch.allclose(min_snr_weights(schedule, steps, 5.0).double(), expected, rtol=1e-5)
    # Early steps (high SNR) are damped, late ones keep full weight (ε) or SNR/(SNR + 1) (v).
    weights = min_snr_weights(schedule, steps, 5.0)
    assert weights[0] < 0.01 and weights[-1] == pytest.approx(
        1.0 if prediction == "epsilon" else float(snr[-1] / (snr[-1] + 1)), rel=1e-4
    )
    assert torch.equal(min_snr_weights(schedule, steps, None), torch.ones(5))


def test_psnr_and_latent_scale_on_hand_made_cases():
    target = torch.zeros(2, 3, 4, 4)
    assert float(psnr(target + 0.2, target)) == pytest.approx(10 * math.log10(4 / 0.04), abs=1e-4)  # 20 dB
    assert float(psnr(target + 5.0, target)) == pytest.approx(10 * math.log10(4 / 1.0), abs=1e-4)  # clamped to 1

    # 1/std of the posterior samples over the batches seen, and only over the first max_batches of them.
    vae = build_vae(sample_size=8, block_out_channels=[8, 8], norm_num_groups=4).eval()
    torch.manual_seed(0)
    batches = [{"pixel_values": torch.rand(4, 3, 8, 8) * 2 - 1} for _ in range(3)]
    for limit in (3, 1):
        torch.manual_seed(1)
        with torch.no_grad():
            latents = torch.cat([vae.encode(b["pixel_values"]).latent_dist.sample() for b in batches[:limit]]).double()
        torch.manual_seed(1)
        assert latent_scale(vae, batches, max_batches=limit) == pytest.approx(
            1 / latents.std(unbiased=False).item(), rel=1e-6
        )


def _tiny_pipeline(schedule, sampler_name: str):
    """A random debug-size StableDiffusionPipeline on `schedule`, built in memory (no folder needed)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    from transformers import CLIPTextConfig, CLIPTextModel

    from support import CONF
    from training.diffusion.export import assemble_pipeline
    from training.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(["a red circle", "two blue squares", "a green star"], vocab_size=300, max_length=16)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=16, pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        )
    )  # fmt: skip
    vae = instantiate(OmegaConf.load(CONF / "model" / "vae_tiny.yaml"))
    unet = instantiate(OmegaConf.load(CONF / "model" / "unet_tiny.yaml"), sample_size=8, in_channels=4,
                       cross_attention_dim=32)  # fmt: skip
    return assemble_pipeline(unet, vae, text_encoder, tokenizer, schedule, sampler_name)


@pytest.mark.parametrize("sampler_name", ["dpm", "ddim"])
def test_zero_terminal_snr_needs_v_prediction_and_reaches_the_exported_sampler(sampler_name):
    from training.errors import UserError

    base = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
            "clip_sample": False}  # fmt: skip
    with pytest.raises(UserError, match="zero_terminal_snr=true needs noise_scheduler.prediction_type=v_prediction"):
        noise_scheduler("epsilon", zero_terminal_snr=True, **base)
    schedule = noise_scheduler("v_prediction", zero_terminal_snr=True, **base)
    assert float(schedule.alphas_cumprod[-1]) < 1e-6  # the last training step is pure noise …
    assert float(noise_scheduler("v_prediction", **base).alphas_cumprod[-1]) > 1e-3  # … which SD's schedule is not
    weights = min_snr_weights(schedule, torch.tensor([0, 500, 999]), 5.0)
    assert torch.isfinite(weights).all() and float(weights[-1]) == 0.0  # v-prediction: min(0, γ)/(0 + 1)

    pipeline = _tiny_pipeline(schedule, sampler_name)
    config = pipeline.scheduler.config
    assert config.rescale_betas_zero_snr and config.timestep_spacing == "trailing"
    assert config.prediction_type == "v_prediction"
    pipeline.scheduler.set_timesteps(4)
    assert int(pipeline.scheduler.timesteps[0]) == 999  # trailing: sampling starts at the zero-SNR step
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(["a red circle"], num_inference_steps=4, guidance_scale=3.0, output_type="np",
                      generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all() and images.std() > 0
