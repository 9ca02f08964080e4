"""The ldm_sr plug-in family on the tiny random model (CPU, fp32): it samples exactly as diffusers'
LDMSuperResolutionPipeline, its exports reload, bad configs fail with fix-it messages, and RFSR's
gradients reach the UNet and nothing else."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import DDPMScheduler, LDMSuperResolutionPipeline
from ldm_sr_family import LDMSRModel, build
from torch import nn

from rfsr_ray.config import ModelConfig
from rfsr_ray.errors import ConfigError, WeightsError
from rfsr_ray.models.protocol import ISRDiffusionModel
from rfsr_ray.testing.conformance import ISRModelConformance

SCALE = 4
STEPS = 10
PACKAGE = Path(__file__).resolve().parents[1] / "ldm_sr_family"


def model_config(pretrained: Path | str | None, **model: Any) -> ModelConfig:
    """The `model:` section a YAML config would hold, validated by rfsr_ray's schema."""
    source = None if pretrained is None else str(pretrained)
    fields = {"family": "plugin", "builder": "ldm_sr_family:build", "pretrained": source}
    return ModelConfig.model_validate({**fields, **model})


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def lr_batch(seed: int = 0) -> torch.Tensor:
    """Two LR images (2, 3, 8, 8) in [0, 1]."""
    return torch.rand(2, 3, 8, 8, generator=seeded(seed))


def perturbed(model: LDMSRModel, seed: int = 0) -> LDMSRModel:
    """`model` with its UNet moved, as training would move it."""
    generator = seeded(seed)
    with torch.no_grad():
        for parameter in model.unet.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model


# ------------------------------------------------------------------ (a) the diffusers pipeline
def test_sample_equals_the_diffusers_pipeline(tiny_folder):
    model = build(model_config(tiny_folder), SCALE, trainable=False)
    lr = lr_batch()
    ours = model.sample(lr, STEPS, seeded(7))
    pipeline = LDMSuperResolutionPipeline.from_pretrained(tiny_folder)  # its own copy
    pipeline.set_progress_bar_config(disable=True)
    # A tensor `image` skips the pipeline's PIL preprocessing and must already be in [-1, 1];
    # output_type="pt" returns (B, 3, H, W) in [0, 1], the range `sample` returns.
    theirs = pipeline(
        image=lr * 2 - 1, num_inference_steps=STEPS, generator=seeded(7), output_type="pt"
    ).images
    assert ours.shape == theirs.shape == (2, 3, 8 * SCALE, 8 * SCALE)
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert ours.std() > 0.01  # a real image, not a constant both sides agree on


def test_model_conforms_and_an_inference_build_has_nothing_to_train(tiny_folder):
    model = build(model_config(tiny_folder), SCALE, trainable=False)
    assert isinstance(model, ISRDiffusionModel)
    assert model.trainable_parameters() == [] and model.trainable_modules() == {}
    lr = lr_batch()
    # Nothing trains, so the model is its own frozen original.
    assert torch.equal(
        model.sample(lr, 4, seeded(1), reference=True), model.sample(lr, 4, seeded(1))
    )


# ------------------------------------------------------------------ (b) save and reload
def test_save_then_build_reproduces_the_trained_samples(tiny_folder, tmp_path):
    base = build(model_config(tiny_folder), SCALE)
    trained = perturbed(build(model_config(tiny_folder), SCALE))
    export = trained.save(tmp_path / "model")
    assert not (export / "rfsr_model.json").exists()  # rfsr_ray writes that, not the family
    reloaded = build(model_config(export), SCALE, trainable=False)
    lr = lr_batch()
    expected = trained.sample(lr, STEPS, seeded(3))
    assert torch.allclose(reloaded.sample(lr, STEPS, seeded(3)), expected, atol=1e-6)
    assert not torch.allclose(base.sample(lr, STEPS, seeded(3)), expected, atol=1e-3)


def test_rfsr_ray_exports_and_reloads_the_plugin(tiny_folder, tmp_path):
    from rfsr_ray.models import build_model, load_model, save_model

    cfg = model_config(tiny_folder, py_modules=[str(PACKAGE)], options={"eta": 0.0})
    model = perturbed(build_model(cfg, SCALE))
    export = save_model(model, cfg, tmp_path / "model")
    lr = lr_batch()
    assert torch.allclose(
        load_model(export).sample(lr, 4, seeded(2)), model.sample(lr, 4, seeded(2)), atol=1e-6
    )


def test_a_rebuilt_sampler_is_saved_with_the_model(tiny_folder, tmp_path):
    model = build(model_config(tiny_folder, sampler="ddpm"), SCALE)
    assert isinstance(model.scheduler, DDPMScheduler)
    assert len(set(model.set_timesteps(STEPS).tolist())) == STEPS
    reloaded = build(model_config(model.save(tmp_path / "model")), SCALE, trainable=False)
    assert isinstance(reloaded.scheduler, DDPMScheduler)  # its own scheduler now


# ------------------------------------------------------------------ (c) options and settings
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"colour": 1}, r"model.options.colour is not an option .* \['eta', 'quantize'\]"),
        ({"eta": 2.0}, r"model.options.eta=2.0 must be less than or equal to 1, e.g. eta: 1.0"),
        ({"quantize": "yes"}, r"model.options.quantize='yes' must be a valid boolean"),
    ],
)
def test_bad_options_are_config_errors_naming_the_key(tiny_folder, options, message):
    with pytest.raises(ConfigError, match=message):
        build(model_config(tiny_folder, options=options), SCALE)


def test_eta_draws_ddim_noise_from_the_generator(tiny_folder):
    lr = lr_batch()
    stochastic = build(model_config(tiny_folder, options={"eta": 1.0}), SCALE, trainable=False)
    deterministic = build(model_config(tiny_folder), SCALE, trainable=False)
    sample = stochastic.sample(lr, 4, seeded(5))
    assert torch.equal(stochastic.sample(lr, 4, seeded(5)), sample)  # reproducible per seed
    assert not torch.allclose(deterministic.sample(lr, 4, seeded(5)), sample, atol=1e-3)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"finetune": "lora", "lora": {"enabled": True}}, "UNet2DModel has no add_adapter"),
        ({"finetune": "attention"}, r"model.finetune='attention' .* use one of \['full'\]"),
        ({"prompt": {"text": "a photo"}}, "model.prompt is set, but the ldm_sr family has no text"),
        ({"memory": {"vae_slicing": True}}, "model.memory.vae_slicing=true is not available"),
    ],
)
def test_settings_the_family_cannot_honour_are_refused(tiny_folder, settings, message):
    with pytest.raises(ConfigError, match=message):
        build(model_config(tiny_folder, **settings), SCALE)


# ------------------------------------------------------------------ (d) scale and folders
def test_a_scale_mismatch_names_both_factors(tiny_folder):
    with pytest.raises(WeightsError, match=r"is a x4 model .* data.scale=2; set data.scale=4"):
        build(model_config(tiny_folder), 2)


@pytest.mark.parametrize("where", ["missing", "empty", "unset"])
def test_an_absent_pretrained_folder_names_it_and_the_fix(tmp_path, where):
    folder = {"missing": tmp_path / "nowhere", "empty": tmp_path, "unset": None}[where]
    message = {"missing": "nowhere': no such folder", "empty": r"lacks \['model_index.json'",
               "unset": "model.pretrained is not set"}[where]  # fmt: skip
    with pytest.raises(WeightsError, match=message) as error:
        build(model_config(folder), SCALE)
    assert "examples/ldm_sr/make_tiny.py" in str(error.value)


# ------------------------------------------------------------------ (e) gradients
def test_x0_gradients_reach_the_unet_only_and_the_reference_stays(tiny_folder):
    model = build(model_config(tiny_folder), SCALE)
    condition = model.condition(lr_batch())
    timestep = model.set_timesteps(STEPS)[STEPS // 2]
    latent = model.start_latent(condition, seeded(1))
    reference_x0 = model.predict_x0(latent, timestep, condition, reference=True)
    assert not reference_x0.requires_grad

    sr = model.decode(model.predict_x0(latent, timestep, condition))
    assert sr.shape == (2, 3, 32, 32) and sr.min() >= 0 and sr.max() <= 1
    (sr - 0.5).square().mean().backward()
    trained = model.trainable_parameters()
    assert len(trained) == len(list(model.unet.parameters()))
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trained)
    assert sum(p.grad.abs().sum() for p in trained) > 0
    frozen = [*model.vqvae.parameters(), *model.reference_unet.parameters()]
    assert all(p.grad is None and not p.requires_grad for p in frozen)

    torch.optim.SGD(trained, lr=1.0).step()
    after = model.predict_x0(latent, timestep, condition, reference=True)
    assert torch.equal(after, reference_x0)  # the original did not move
    moved = model.predict_x0(latent, timestep, condition).detach()
    assert not torch.allclose(moved, reference_x0, atol=1e-4)  # the trained UNet did


def test_the_trained_forward_runs_through_the_wrapper(tiny_folder):
    class Counting(nn.Module):
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module, self.calls = module, 0

        def forward(self, *args: Any) -> Any:
            self.calls += 1
            return self.module(*args)

    model = build(model_config(tiny_folder), SCALE)
    wrapper = model.wrap_trainable(Counting)["unet"]
    condition = model.condition(lr_batch())
    latent = model.start_latent(condition, seeded(0))
    timestep = model.set_timesteps(4)[0]
    model.predict_x0(latent, timestep, condition)
    model.predict_x0(latent, timestep, condition, reference=True)
    assert wrapper.calls == 1 and model.trainable_modules() == {"unet": model.unet}
    model.unwrap_trainable()
    model.predict_x0(latent, timestep, condition)
    assert wrapper.calls == 1


def test_denoise_loss_is_seeded_and_trains_the_unet(tiny_folder):
    model = build(model_config(tiny_folder), SCALE)
    hr = torch.rand(2, 3, 32, 32, generator=seeded(4))
    lr = torch.nn.functional.interpolate(hr, scale_factor=1 / SCALE, mode="area")
    loss = model.denoise_loss(hr, lr, seeded(9))
    assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0
    assert torch.equal(model.denoise_loss(hr, lr, seeded(9)), loss)
    loss.backward()
    assert all(p.grad is not None for p in model.trainable_parameters())
    assert all(p.grad is None for p in model.vqvae.parameters())


# ------------------------------------------------------------------ rfsr_ray's conformance kit
class TestConformance(ISRModelConformance):
    """rfsr_ray's protocol checks, one test each, through the path a run takes: built by
    rfsr_ray's plug-in builder, exported with its record, reloaded by `load_model`."""

    lr_size = 8

    @pytest.fixture(autouse=True)
    def _folder(self, tiny_folder):
        self.cfg = model_config(tiny_folder, py_modules=[str(PACKAGE)])

    def build_model(self) -> ISRDiffusionModel:
        from rfsr_ray.models import build_model

        return build_model(self.cfg, SCALE)

    def save_model(self, model: ISRDiffusionModel, path: Path) -> Path:
        from rfsr_ray.models import save_model

        return save_model(model, self.cfg, path)
