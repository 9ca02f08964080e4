"""Training rollouts follow the sampler users run: with classifier-free guidance configured, the
trajectory-mode rollout to index i is the diffusers pipeline's guided sampling up to index i."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionControlNetPipeline, StableDiffusionUpscalePipeline

from rfsr_ray.config import build_config
from rfsr_ray.models import build_model
from rfsr_ray.train.step import latent_at_index

STEPS = 5
PROMPT = {"text": "a photo", "negative": "blurry", "guidance_scale": 3.0}


def model_for(folders, family: str, **prompt: object):
    model = {"family": family, "pretrained": str(folders[family]), "prompt": {**PROMPT, **prompt}}
    return build_model(build_config({"model": model}).model, 4, trainable=False)


def lr_image() -> torch.Tensor:
    hr = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return F.interpolate(hr, scale_factor=0.25, mode="area")


def seeded() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def rollout(model, index: int) -> torch.Tensor:
    """x_t at `index` as RFSR training reaches it (trajectory mode, train-mode condition)."""
    generator = seeded()
    condition = model.condition(lr_image(), generator, mode="train")
    timesteps = model.set_timesteps(STEPS)
    return latent_at_index(model, condition, timesteps, index, "trajectory", generator)


def upscaler_latents(folder: Path) -> list[torch.Tensor]:
    """The guided pipeline's latent after each step: entry k is x at index k + 1."""
    found: list[torch.Tensor] = []
    StableDiffusionUpscalePipeline.from_pretrained(folder)(
        prompt=["a photo"] * 2,
        negative_prompt=["blurry"] * 2,
        image=lr_image(),
        num_inference_steps=STEPS,
        guidance_scale=3.0,
        noise_level=20,
        generator=seeded(),
        output_type="latent",
        callback=lambda step, t, latents: found.append(latents.clone()),
        callback_steps=1,
    )
    return found


def controlnet_latents(folder: Path) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []

    def keep(pipe, step, timestep, tensors):
        found.append(tensors["latents"].clone())
        return tensors

    control = F.interpolate(lr_image(), size=(32, 32), mode="bicubic", align_corners=False)
    StableDiffusionControlNetPipeline.from_pretrained(folder)(
        prompt=["a photo"] * 2,
        negative_prompt=["blurry"] * 2,
        image=control.clamp(0, 1),
        height=32,
        width=32,
        num_inference_steps=STEPS,
        guidance_scale=3.0,
        controlnet_conditioning_scale=1.0,
        generator=seeded(),
        output_type="latent",
        callback_on_step_end=keep,
    )
    return found


@pytest.mark.parametrize("family", ["sd_upscaler", "controlnet_sr"])
@pytest.mark.parametrize("index", [1, 3])
def test_guided_rollout_matches_the_pipeline_up_to_the_index(folders, family, index):
    model = model_for(folders, family)
    theirs = (upscaler_latents if family == "sd_upscaler" else controlnet_latents)(folders[family])
    ours = rollout(model, index)
    assert (ours - theirs[index - 1]).abs().max().item() <= 1e-4


def test_training_guidance_is_configurable_and_the_denoise_objective_is_unguided(folders):
    default = model_for(folders, "controlnet_sr")
    assert default.condition(lr_image(), seeded(), mode="train").guidance_scale == 3.0
    assert default.condition(lr_image(), seeded(), mode="denoise").guidance_scale == 1.0
    unguided = model_for(folders, "controlnet_sr", train_guidance_scale=1.0)
    condition = unguided.condition(lr_image(), seeded(), mode="train")
    assert not condition.guided and condition.prompt_embeds.shape[0] == 2
    assert unguided.condition(lr_image(), seeded(), mode="sample").guidance_scale == 3.0
    # Unguided training rollouts leave the guided trajectory.
    assert (rollout(unguided, 3) - rollout(default, 3)).abs().max().item() > 1e-3
