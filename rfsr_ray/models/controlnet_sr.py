"""The `controlnet_sr` family: a Stable Diffusion UNet plus a ControlNet that sees the
bicubic-upsampled LR image (the SeeSR / DP²O-SR design; SeeSR's own weights: the `seesr` family).

x_T is pure noise (StableDiffusionControlNetPipeline) or the VAE latent of the upsampled LR noised
(`start: lr_latent`). SeeSR and the RFSR reference noise it to the last training timestep T-1 (999
for SD 2; `lr_latent_timestep: final_train`, the default); StableDiffusionControlNetImg2ImgPipeline
at strength 1 noises it to the first inference timestep instead (981 for 50 steps of SD 2's
schedule; `first_inference`), and only that option samples exactly as that pipeline does.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import (
    ControlNetModel,
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionControlNetPipeline,
)
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from rfsr_ray.config import ModelConfig
from rfsr_ray.errors import WeightsError
from rfsr_ray.hub import require_component, resolve
from rfsr_ray.models.latent import LatentCondition, LatentSRModel, Mode
from rfsr_ray.models.lora import ADAPTER, has_lora, lora_state_dict, merged_copy
from rfsr_ray.models.sd_components import load_scheduler, load_text_parts, load_unet, load_vae

CONTROLNET_LORA_DIR = "controlnet_lora"


class ControlNetSRModel(LatentSRModel):
    family = "controlnet_sr"

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def condition(
        self,
        lr_image: torch.Tensor,
        generator: torch.Generator | None = None,
        prompts: list[str] | None = None,
        mode: Mode = "sample",
    ) -> LatentCondition:
        """The control image: LR upsampled bicubically to HR size, (B, 3, H, W) in [0, 1]."""
        batch = lr_image.shape[0]
        embeds, guidance = self.prompt_embeds(prompts, batch, generator, mode)
        control = self.control_image(lr_image, embeds.dtype)
        image = torch.cat([control] * (2 if guidance > 1 else 1))
        return LatentCondition(batch, embeds, image, guidance, control=control)

    def control_image(self, lr_image: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """lr_image (B, 3, h, w) in [0, 1] → (B, 3, h·s, w·s) in [0, 1], bicubic, in `dtype`."""
        size = (lr_image.shape[-2] * self.scale, lr_image.shape[-1] * self.scale)
        control = F.interpolate(lr_image, size=size, mode="bicubic", align_corners=False)
        return control.clamp(0, 1).to(dtype)

    def start_latent(
        self, condition: LatentCondition, generator: torch.Generator | None
    ) -> torch.Tensor:
        """x_T, (B, C, H/f, W/f): noise, or the LR latent noised to `lr_latent_start_timestep`
        (draws in the img2img pipeline's order: VAE posterior sample, then noise)."""
        assert condition.control is not None  # built by `condition`
        dtype = condition.prompt_embeds.dtype
        if self.cfg.controlnet_sr.start == "noise":
            height, width = (s // self.vae_scale_factor for s in condition.control.shape[-2:])
            shape = (condition.batch_size, self.vae.config.latent_channels, height, width)
            latent = randn_tensor(shape, generator=generator, device=self.device, dtype=dtype)
            return latent * self.scheduler.init_noise_sigma
        timestep = self.lr_latent_start_timestep().repeat(condition.batch_size)
        clean = self.encode(condition.control, generator).to(dtype)
        noise = randn_tensor(clean.shape, generator=generator, device=self.device, dtype=dtype)
        return self.scheduler.add_noise(clean, noise, timestep)

    def lr_latent_start_timestep(self) -> torch.Tensor:
        """(1,) the timestep the LR latent is noised to: T-1 for `final_train` (SeeSR and the
        reference: √ᾱ = 0.068 on SD 2, the noisiest level the model was trained at) or the
        schedule's first timestep for `first_inference` (the img2img pipeline at strength 1)."""
        if self.cfg.controlnet_sr.lr_latent_timestep == "final_train":
            final = self.scheduler.config.num_train_timesteps - 1
            return torch.tensor([final], dtype=torch.long, device=self.device)
        if self.scheduler.num_inference_steps is None:
            raise RuntimeError("call set_timesteps before start_latent (lr_latent start)")
        return self.scheduler.timesteps[:1]

    def _denoise(
        self,
        latent_input: torch.Tensor,
        timestep: torch.Tensor,
        condition: LatentCondition,
        unet: nn.Module,
        controlnet: nn.Module | None,
    ) -> torch.Tensor:
        assert controlnet is not None  # the family always has one
        extra = self._denoiser_kwargs(condition, latent_input.dtype)
        down, mid = controlnet(
            latent_input,
            timestep,
            encoder_hidden_states=condition.prompt_embeds,
            controlnet_cond=condition.image.to(latent_input.dtype),
            conditioning_scale=self.conditioning_scale,
            return_dict=False,
            **extra,
        )
        return unet(
            latent_input,
            timestep,
            encoder_hidden_states=condition.prompt_embeds,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            return_dict=False,
            **extra,
        )[0]

    @property
    def conditioning_scale(self) -> float:
        """The weight of the ControlNet's residuals in the UNet."""
        return self.cfg.controlnet_sr.conditioning_scale

    def _denoiser_kwargs(self, condition: LatentCondition, dtype: torch.dtype) -> dict:
        """Keyword arguments a subclass adds to both the ControlNet and the UNet call (SeeSR:
        its image embeddings); none here."""
        return {}

    def pipeline(
        self, merged: bool = True
    ) -> StableDiffusionControlNetPipeline | StableDiffusionControlNetImg2ImgPipeline:
        """The matching diffusers pipeline over this model's components (img2img for
        `lr_latent`). It samples exactly like `sample` for `start: noise` and for `lr_latent`
        with `lr_latent_timestep: first_inference`; with `final_train` (the default) the
        img2img pipeline at strength 1 starts from the LR latent noised to the first inference
        timestep, not T-1, so its x_T is slightly less noisy (√ᾱ 0.076 vs 0.068 for 50 steps
        of SD 2)."""
        unet, controlnet = self.unet, self.controlnet
        if merged:
            unet, controlnet = merged_copy(unet), merged_copy(controlnet)
        pipeline_cls = (
            StableDiffusionControlNetPipeline
            if self.cfg.controlnet_sr.start == "noise"
            else StableDiffusionControlNetImg2ImgPipeline
        )
        return pipeline_cls(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=unet,
            controlnet=controlnet,
            scheduler=self.scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    def save_lora(self, path: Path) -> None:
        if has_lora(self.unet):
            StableDiffusionControlNetPipeline.save_lora_weights(
                path,
                unet_lora_layers=lora_state_dict(self.unet),
                unet_lora_adapter_metadata=self.unet.peft_config[ADAPTER].to_dict(),
            )
        if has_lora(self.controlnet):
            self.controlnet.save_lora_adapter(path / CONTROLNET_LORA_DIR, adapter_name=ADAPTER)


def load_controlnet_sr(
    cfg: ModelConfig, scale: int, trainable: bool = True, key: str = "model.pretrained"
) -> ControlNetSRModel:
    """SD components from `cfg.pretrained`; the ControlNet from `controlnet_sr.controlnet` or
    the `controlnet/` folder beside them."""
    assert cfg.pretrained is not None  # the schema requires it for this family
    folder = resolve(cfg.pretrained, cfg.revision, key)
    source = cfg.controlnet_sr.controlnet
    if source is not None:
        controlnet_dir = resolve(source, None, "model.controlnet_sr.controlnet")
    elif (folder / "controlnet").is_dir():
        controlnet_dir = folder / "controlnet"
    else:
        raise WeightsError(
            f"{key}={cfg.pretrained!r} has no controlnet/ folder; set "
            "model.controlnet_sr.controlnet to the ControlNet's hub id or folder"
        )
    controlnet = ControlNetModel.from_pretrained(controlnet_dir, local_files_only=True)
    text_encoder, tokenizer = load_text_parts(folder, key)
    return ControlNetSRModel(
        load_unet(folder, key),
        load_vae(folder, key),
        text_encoder,
        tokenizer,
        load_scheduler(require_component(folder, "scheduler", key), cfg.sampler),
        cfg,
        scale,
        controlnet=controlnet,
        trainable=trainable,
    )
