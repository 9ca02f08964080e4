"""The `sd_upscaler` family: the Stable Diffusion ×4 upscaler (StableDiffusionUpscalePipeline).

The UNet sees the latent concatenated with the LR image (in [-1, 1], noised by the low-res DDPM
scheduler to `noise_level`, which also enters as the UNet's class label). The latent has the LR's
size; the VAE decodes it ×4. The released model is a v-prediction model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import DDPMScheduler, StableDiffusionUpscalePipeline
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from rfsr_ray.config import ModelConfig
from rfsr_ray.errors import WeightsError
from rfsr_ray.hub import require_component, resolve
from rfsr_ray.models.latent import LatentCondition, LatentSRModel, Mode
from rfsr_ray.models.lora import ADAPTER, lora_state_dict, merged_copy
from rfsr_ray.models.sd_components import load_scheduler, load_text_parts, load_unet, load_vae


class SDUpscalerModel(LatentSRModel):
    family = "sd_upscaler"

    def __init__(
        self,
        *args: object,
        low_res_scheduler: DDPMScheduler,
        max_noise_level: int = 350,
        **kwargs: object,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.low_res_scheduler = low_res_scheduler
        self.max_noise_level = max_noise_level
        noise_level = self.cfg.sd_upscaler.noise_level
        class_embeds = self.unet.config.num_class_embeds
        if noise_level > max_noise_level or (class_embeds and noise_level >= class_embeds):
            raise WeightsError(
                f"model.sd_upscaler.noise_level={noise_level} is above what this upscaler "
                f"accepts (max {min(max_noise_level, (class_embeds or 10**9) - 1)})"
            )

    def condition(
        self,
        lr_image: torch.Tensor,
        generator: torch.Generator | None = None,
        prompts: list[str] | None = None,
        mode: Mode = "sample",
    ) -> LatentCondition:
        """LR (B, 3, h, w) in [0, 1] → [-1, 1], noised to `noise_level` (pipeline steps 4-5)."""
        batch = lr_image.shape[0]
        embeds, guidance = self.prompt_embeds(prompts, batch, generator, mode)
        image = (lr_image * 2 - 1).to(embeds.dtype)
        noise_level = torch.tensor(
            [self.cfg.sd_upscaler.noise_level], dtype=torch.long, device=image.device
        )
        noise = randn_tensor(
            image.shape, generator=generator, device=image.device, dtype=image.dtype
        )
        image = self.low_res_scheduler.add_noise(image, noise, noise_level)
        image = torch.cat([image] * (2 if guidance > 1 else 1))
        noise_level = torch.cat([noise_level] * image.shape[0])
        return LatentCondition(batch, embeds, image, guidance, noise_level=noise_level)

    def start_latent(
        self, condition: LatentCondition, generator: torch.Generator | None
    ) -> torch.Tensor:
        height, width = condition.image.shape[-2:]
        shape = (condition.batch_size, self.vae.config.latent_channels, height, width)
        dtype = condition.prompt_embeds.dtype
        latent = randn_tensor(shape, generator=generator, device=self.device, dtype=dtype)
        return latent * self.scheduler.init_noise_sigma

    def _denoise(
        self,
        latent_input: torch.Tensor,
        timestep: torch.Tensor,
        condition: LatentCondition,
        unet: nn.Module,
        controlnet: nn.Module | None,
    ) -> torch.Tensor:
        inputs = torch.cat([latent_input, condition.image.to(latent_input.dtype)], dim=1)
        return unet(
            inputs,
            timestep,
            encoder_hidden_states=condition.prompt_embeds,
            class_labels=condition.noise_level,
            return_dict=False,
        )[0]

    def pipeline(self, merged: bool = True) -> StableDiffusionUpscalePipeline:
        unet = merged_copy(self.unet) if merged else self.unet
        return StableDiffusionUpscalePipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=unet,
            low_res_scheduler=self.low_res_scheduler,
            scheduler=self.scheduler,
            max_noise_level=self.max_noise_level,
        )

    def save_lora(self, path: Path) -> None:
        StableDiffusionUpscalePipeline.save_lora_weights(
            path,
            unet_lora_layers=lora_state_dict(self.unet),
            unet_lora_adapter_metadata=self.unet.peft_config[ADAPTER].to_dict(),
        )


def load_sd_upscaler(
    cfg: ModelConfig, scale: int, trainable: bool = True, key: str = "model.pretrained"
) -> SDUpscalerModel:
    """The upscaler from `cfg.source` (a diffusers folder or hub id)."""
    if scale != 4:
        raise WeightsError(
            f"the sd_upscaler family is a x4 model but data.scale={scale}; set data.scale=4"
        )
    assert cfg.source is not None  # the family has a default hub id
    folder = resolve(cfg.source, cfg.revision, key)
    text_encoder, tokenizer = load_text_parts(folder, key)
    low_res = DDPMScheduler.from_pretrained(require_component(folder, "low_res_scheduler", key))
    max_noise_level = _max_noise_level(folder)
    return SDUpscalerModel(
        load_unet(folder, key),
        load_vae(folder, key),
        text_encoder,
        tokenizer,
        load_scheduler(require_component(folder, "scheduler", key), cfg.sampler),
        cfg,
        scale,
        trainable=trainable,
        low_res_scheduler=low_res,
        max_noise_level=max_noise_level,
    )


def _max_noise_level(folder: Path) -> int:
    index = folder / "model_index.json"
    if index.is_file():
        return int(json.loads(index.read_text()).get("max_noise_level", 350))
    return 350
