"""`model.tiny.residual`: the tiny family's x̂0 is bicubic(LR) + UNet output, consistently in every
path (scheduler step, predict_x0, the denoising loss, the frozen reference, persistence)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from rfsr_ray.errors import ConfigError
from rfsr_ray.models import build_model, load_model
from rfsr_ray.models.tiny import MODEL_INFO_FILE, TinySRModel
from tests.unit.helpers import fixed_batch, seeded, tiny_config

STEPS = 4  # sampler steps: few, so each test stays fast


def residual_model(trained: bool = True) -> TinySRModel:
    """A residual tiny model; `trained`: its zero-initialised last convolution (trained and
    reference UNet alike) replaced by random weights, so the residual is not 0."""
    cfg = tiny_config(model={"tiny": {"prediction_type": "sample", "residual": True}})
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.data.scale)
    assert isinstance(model, TinySRModel) and model.residual
    if trained:
        for unet in (model.unet, model.reference_unet):
            torch.nn.init.normal_(unet.conv_out.weight, std=0.05)
            torch.nn.init.normal_(unet.conv_out.bias, std=0.05)
    return model


def bicubic(lr_image: torch.Tensor, scale: int) -> torch.Tensor:
    size = (lr_image.shape[-2] * scale, lr_image.shape[-1] * scale)
    return F.interpolate(lr_image, size=size, mode="bicubic", align_corners=False).clamp(0, 1)


@pytest.mark.parametrize("reference", [False, True])
def test_predict_x0_is_the_x0_a_ddim_step_implies(reference):
    model = residual_model()
    condition = model.condition(fixed_batch(16).lr_image)
    timesteps = model.set_timesteps(STEPS)
    latent = torch.randn(condition.shape, generator=seeded(1))
    for timestep in timesteps[[0, STEPS - 1]]:
        with torch.no_grad():
            ours = model.predict_x0(latent, timestep, condition, reference=reference)
            output = model.model_output(latent, timestep, condition, reference=reference)
        implied = model.scheduler.step(output, timestep, latent).pred_original_sample
        torch.testing.assert_close(ours, implied)
        # DDIM (eta 0): x_{t-1} = √ᾱ_prev·x̂0 + √(1−ᾱ_prev)·ε̂ with ε̂ from x̂0, i.e. the step is a
        # function of predict_x0 alone.
        prev = model.sampler_step(latent, timestep, condition, None, reference=reference)
        step = model.scheduler.config.num_train_timesteps // STEPS
        abar = model.scheduler.alphas_cumprod
        abar_t = abar[int(timestep)]
        abar_prev = abar[int(timestep) - step] if int(timestep) >= step else torch.tensor(1.0)
        eps = (latent - abar_t.sqrt() * ours) / (1 - abar_t).sqrt()
        expected = abar_prev.sqrt() * ours + (1 - abar_prev).sqrt() * eps
        torch.testing.assert_close(prev, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("reference", [False, True])
def test_x0_is_the_condition_plus_the_unet_output(reference):
    model = residual_model()
    with torch.no_grad():  # the frozen reference drifts from the trained UNet after updates
        model.unet.conv_out.bias.add_(0.1)
    condition = model.condition(fixed_batch(16).lr_image)
    latent = torch.randn(condition.shape, generator=seeded(2))
    timestep = model.set_timesteps(STEPS)[1]
    unet = model.reference_unet if reference else model.unet
    with torch.no_grad():
        x0 = model.predict_x0(latent, timestep, condition, reference=reference)
        residual = unet(torch.cat([latent, condition], 1), timestep).sample
    assert residual.abs().mean() > 0.01
    torch.testing.assert_close(x0, condition + residual)


def test_an_untrained_residual_model_samples_exactly_bicubic():
    model = residual_model(trained=False)  # its UNet's output is exactly 0
    lr_image = fixed_batch(16).lr_image
    expected = bicubic(lr_image, model.scale)
    condition = model.condition(lr_image)
    latent = torch.randn(condition.shape, generator=seeded(3))
    for timestep in model.set_timesteps(STEPS)[[0, STEPS - 1]]:
        x0 = model.decode(model.predict_x0(latent, timestep, condition))
        torch.testing.assert_close(x0, expected)
    for reference in (False, True):
        sample = model.sample(lr_image, STEPS, seeded(4), reference=reference)
        torch.testing.assert_close(sample, expected, rtol=0, atol=1e-5)


def test_denoise_loss_is_the_residual_mse():
    model = residual_model(trained=False)
    batch = fixed_batch(16)
    expected = F.mse_loss(model.condition(batch.lr_image), batch.hr_image * 2 - 1)
    loss = model.denoise_loss(batch.hr_image, batch.lr_image, seeded(5))
    torch.testing.assert_close(loss, expected)


def test_save_and_load_keep_residual(tmp_path):
    model = residual_model()
    model.save(tmp_path / "model")
    assert json.loads((tmp_path / "model" / MODEL_INFO_FILE).read_text())["residual"] is True
    loaded = load_model(tmp_path / "model")
    assert isinstance(loaded, TinySRModel) and loaded.residual
    lr_image = fixed_batch(16).lr_image
    torch.testing.assert_close(
        loaded.sample(lr_image, STEPS, seeded(6)), model.sample(lr_image, STEPS, seeded(6))
    )


def test_an_export_without_the_key_loads_as_plain_x0(tmp_path):
    cfg = tiny_config(model={"tiny": {"prediction_type": "sample"}})
    model = build_model(cfg.model, cfg.data.scale)
    model.save(tmp_path / "old")
    info_file = tmp_path / "old" / MODEL_INFO_FILE
    info_file.write_text(json.dumps({"family": "tiny", "scale": 4}))  # written before `residual`
    loaded = load_model(tmp_path / "old")
    assert isinstance(loaded, TinySRModel) and not loaded.residual
    condition = loaded.condition(fixed_batch(16).lr_image)
    latent = torch.randn(condition.shape, generator=seeded(7))
    timestep = loaded.set_timesteps(STEPS)[0]
    with torch.no_grad():
        unet = loaded.unet(torch.cat([latent, condition], 1), timestep).sample
        torch.testing.assert_close(loaded.predict_x0(latent, timestep, condition), unet)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_residual_needs_x0_prediction(prediction_type):
    cfg = tiny_config(model={"tiny": {"prediction_type": prediction_type, "residual": True}})
    with pytest.raises(ConfigError, match="prediction_type=sample"):
        build_model(cfg.model, cfg.data.scale)
