"""A minimal rfsr_ray plug-in family: a pixel-space UNet on [x_t, bicubic(LR)] (docs/plugins.md).

model: {family: plugin, builder: "skeleton_family:build", options: {channels: [16, 32]}}
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, UNet2DModel
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from rfsr_ray.errors import ConfigError
from rfsr_ray.models.diffusion import (
    checked_timesteps,
    denoise_target,
    sample_sr,
    x0_from_model_output,
)
from rfsr_ray.models.wrapping import TrainableWrappers


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    channels: tuple[int, ...] = (16, 32)


class SkeletonSR(TrainableWrappers, nn.Module):
    family = "skeleton"

    def __init__(self, unet: UNet2DModel, scheduler: DDIMScheduler, scale: int) -> None:
        super().__init__()
        self.unet, self.scheduler, self.scale = unet, scheduler, scale
        self.reference_unet = copy.deepcopy(unet).requires_grad_(False)  # the frozen original

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.unet.parameters())

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"unet": self.unet}

    def condition(self, lr_image, generator=None, prompts=None, mode="sample") -> torch.Tensor:
        return F.interpolate(lr_image, scale_factor=self.scale, mode="bicubic") * 2 - 1

    def start_latent(self, condition, generator) -> torch.Tensor:
        return torch.randn(
            condition.shape, generator=generator, device=condition.device, dtype=condition.dtype
        )

    def set_timesteps(self, num_inference_steps: int) -> torch.Tensor:
        return checked_timesteps(self.scheduler, num_inference_steps)

    def _output(self, latent, timestep, condition, reference) -> torch.Tensor:
        unet = self.reference_unet if reference else self.forward_module("unet")
        return unet(torch.cat([latent, condition], dim=1), timestep).sample

    @torch.no_grad()
    def sampler_step(self, latent, timestep, condition, generator, reference=False):
        output = self._output(latent, timestep, condition, reference)
        return self.scheduler.step(output, timestep, latent, generator=generator).prev_sample

    def predict_x0(self, latent, timestep, condition, reference=False) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not reference):
            output = self._output(latent, timestep, condition, reference)
            return x0_from_model_output(self.scheduler, output, timestep, latent)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        image = (latent + 1) / 2
        return image + (image.clamp(0, 1) - image).detach()  # in [0, 1], gradient kept

    def sample(self, lr_image, num_inference_steps, generator=None, reference=False):
        return sample_sr(self, lr_image, num_inference_steps, generator, reference)

    def denoise_loss(self, hr_image, lr_image, generator) -> torch.Tensor:
        clean = hr_image * 2 - 1
        noise = torch.randn(clean.shape, generator=generator, device=clean.device)
        steps = self.scheduler.config.num_train_timesteps
        timestep = torch.randint(0, steps, (clean.shape[0],), generator=generator).to(clean.device)
        noisy = self.scheduler.add_noise(clean, noise, timestep)
        output = self._output(noisy, timestep, self.condition(lr_image), reference=False)
        return F.mse_loss(output, denoise_target(self.scheduler, clean, noise, timestep))

    def save(self, path: str | Path) -> Path:
        self.unet.save_pretrained(Path(path) / "unet")
        self.scheduler.save_pretrained(Path(path) / "scheduler")
        return Path(path)


def build(cfg, scale: int, trainable: bool) -> SkeletonSR:
    """rfsr_ray's entry point: `cfg` is the run's ModelConfig, `cfg.options` ours to check."""
    try:
        options = Options.model_validate(cfg.options)
    except ValidationError as error:
        raise ConfigError(f"model.options: {error.errors()[0]['msg']} (keys: channels)") from None
    if cfg.pretrained:  # a base folder, or an export of this family
        unet = UNet2DModel.from_pretrained(Path(cfg.pretrained) / "unet")
        scheduler = DDIMScheduler.from_pretrained(Path(cfg.pretrained) / "scheduler")
    else:
        channels = options.channels
        unet = UNet2DModel(
            in_channels=6,
            out_channels=3,
            block_out_channels=channels,
            down_block_types=("DownBlock2D",) * len(channels),
            up_block_types=("UpBlock2D",) * len(channels),
            norm_num_groups=8,
        )
        scheduler = DDIMScheduler(clip_sample=False, timestep_spacing="trailing")
    return SkeletonSR(unet, scheduler, scale)
