"""The built-in `tiny` family: a pixel-space conditional diffusion SR model from diffusers parts.

The denoiser is a `UNet2DModel` that sees the noisy HR image concatenated with the bicubic-upsampled
LR image (6 input channels). Pixels live in [-1, 1]; x_T is pure noise. It exists so the whole
system runs and is tested on a CPU and so the embedded default has a real base model.

With `residual` (x0-prediction only) the UNet predicts the residual over the bicubic upsampling:
x̂0 = bicubic(LR) + UNet(x_t, bicubic(LR)), as residual SR diffusion models do. The latent is still
the HR image, so `decode` and the scheduler are unchanged; `model_output` returns the full x̂0, so
every consumer (scheduler step, `predict_x0`, the denoising loss, the frozen reference) sees the
same parameterisation. A zero UNet is then exactly bicubic, which a few hundred CPU steps refine
instead of having to learn colour and low frequencies from scratch.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, SchedulerMixin, UNet2DModel
from torch import nn

from rfsr_ray.config import ModelConfig, TinyModelConfig
from rfsr_ray.errors import ConfigError, WeightsError
from rfsr_ray.models.diffusion import (
    checked_timesteps,
    denoise_target,
    sample_sr,
    x0_from_model_output,
)
from rfsr_ray.models.wrapping import TrainableWrappers

MODEL_INFO_FILE = "rfsr_model.json"


def build_unet(cfg: TinyModelConfig) -> UNet2DModel:
    """A freshly initialised denoiser; with `residual` its last convolution starts at zero, so the
    untrained model is exactly bicubic upsampling (random initial residuals cost the short CPU
    pretraining most of its steps)."""
    depth = len(cfg.block_out_channels)
    unet = UNet2DModel(
        in_channels=6,
        out_channels=3,
        block_out_channels=cfg.block_out_channels,
        layers_per_block=cfg.layers_per_block,
        norm_num_groups=cfg.norm_num_groups,
        down_block_types=("DownBlock2D",) * depth,
        up_block_types=("UpBlock2D",) * depth,
    )
    if cfg.residual:
        nn.init.zeros_(unet.conv_out.weight)
        nn.init.zeros_(unet.conv_out.bias)
    return unet


def build_scheduler(cfg: TinyModelConfig, sampler: str | None) -> SchedulerMixin:
    # clip_sample off: x̂0 must be the plain parameterisation so rewards see the model's real
    # prediction; "trailing" spacing makes index 0 start at the last training timestep (pure noise).
    kwargs = {
        "num_train_timesteps": cfg.num_train_timesteps,
        "beta_schedule": cfg.beta_schedule,
        "prediction_type": cfg.prediction_type,
        "clip_sample": False,
        "timestep_spacing": "trailing",
    }
    return DDPMScheduler(**kwargs) if sampler == "ddpm" else DDIMScheduler(**kwargs)


def check_residual(residual: bool, prediction_type: str) -> None:
    """Refuse `residual` unless the denoiser predicts x0 (the residual is over x̂0)."""
    if residual and prediction_type != "sample":
        raise ConfigError(
            f"model.tiny.residual=true needs model.tiny.prediction_type=sample (x̂0 = bicubic + "
            f"UNet output), not {prediction_type!r}; set prediction_type: sample or residual: false"
        )


class TinySRModel(TrainableWrappers, nn.Module):
    """Implements `ISRDiffusionModel` for the tiny pixel-space family.

    `residual`: the UNet predicts x̂0 − bicubic(LR) (prediction_type "sample" only).
    """

    family = "tiny"

    def __init__(
        self, unet: UNet2DModel, scheduler: SchedulerMixin, scale: int, residual: bool = False
    ) -> None:
        super().__init__()
        check_residual(residual, scheduler.config.prediction_type)
        self.unet = unet
        self.scheduler = scheduler
        self.scale = scale
        self.residual = residual
        # The frozen original model for the Gram regulariser: a copy taken before any update.
        self.reference_unet = copy.deepcopy(unet).requires_grad_(False).eval()

    # ------------------------------------------------------------------ parameters
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.unet.parameters() if p.requires_grad]

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"unet": self.unet}

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    # ------------------------------------------------------------------ sampling pieces
    def condition(
        self,
        lr_image: torch.Tensor,
        generator: torch.Generator | None = None,
        prompts: list[str] | None = None,
        mode: str = "sample",
    ) -> torch.Tensor:
        """Bicubic-upsampled LR in [-1, 1]: (B, 3, H, W); the tiny model has no text input."""
        size = (lr_image.shape[-2] * self.scale, lr_image.shape[-1] * self.scale)
        upsampled = F.interpolate(lr_image, size=size, mode="bicubic", align_corners=False)
        return upsampled.clamp(0, 1) * 2 - 1

    def start_latent(
        self, condition: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        return torch.randn(
            condition.shape, generator=generator, device=condition.device, dtype=condition.dtype
        )

    def set_timesteps(self, num_inference_steps: int) -> torch.Tensor:
        return checked_timesteps(self.scheduler, num_inference_steps, self.device)

    def _denoiser(self, reference: bool) -> nn.Module:
        return self.reference_unet if reference else self.forward_module("unet")

    def model_output(
        self,
        latent: torch.Tensor,
        timestep: torch.Tensor,
        condition: torch.Tensor,
        reference: bool = False,
    ) -> torch.Tensor:
        """The denoiser output in the scheduler's parameterisation, (B, 3, H, W); with `residual`
        the UNet's residual plus the condition, i.e. x̂0 itself."""
        condition = condition.to(latent.dtype)
        inputs = torch.cat([latent, condition], dim=1)
        output = self._denoiser(reference)(inputs, timestep).sample
        return condition + output if self.residual else output

    @torch.no_grad()
    def sampler_step(
        self,
        latent: torch.Tensor,
        timestep: torch.Tensor,
        condition: torch.Tensor,
        generator: torch.Generator | None,
        reference: bool = False,
    ) -> torch.Tensor:
        output = self.model_output(latent, timestep, condition, reference)
        return self.scheduler.step(output, timestep, latent, generator=generator).prev_sample

    def predict_x0(
        self,
        latent: torch.Tensor,
        timestep: torch.Tensor,
        condition: torch.Tensor,
        reference: bool = False,
    ) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not reference):
            output = self.model_output(latent, timestep, condition, reference)
            return x0_from_model_output(self.scheduler, output, timestep, latent)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        image = (latent + 1) / 2
        # Straight-through clamp: values in [0, 1], but out-of-range pixels keep their gradient,
        # so losses can pull a wild x̂0 back instead of seeing a flat zero-gradient region.
        return image + (image.clamp(0, 1) - image).detach()

    def sample(
        self,
        lr_image: torch.Tensor,
        num_inference_steps: int,
        generator: torch.Generator | None = None,
        reference: bool = False,
    ) -> torch.Tensor:
        return sample_sr(self, lr_image, num_inference_steps, generator, reference)

    # ------------------------------------------------------------------ objectives
    def denoise_loss(
        self, hr_image: torch.Tensor, lr_image: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        clean = hr_image * 2 - 1
        noise = torch.randn(clean.shape, generator=generator, device=clean.device)
        steps = self.scheduler.config.num_train_timesteps
        timestep = torch.randint(
            0, steps, (clean.shape[0],), generator=generator, device=clean.device
        )
        noisy = self.scheduler.add_noise(clean, noise, timestep)
        output = self.model_output(noisy, timestep, self.condition(lr_image))
        target = denoise_target(self.scheduler, clean, noise, timestep)
        return F.mse_loss(output.float(), target.float())

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> Path:
        path = Path(path)
        self.unet.save_pretrained(path / "unet")
        self.scheduler.save_pretrained(path / "scheduler")
        info = {"family": self.family, "scale": self.scale, "residual": self.residual}
        (path / MODEL_INFO_FILE).write_text(json.dumps(info))
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path, sampler: str | None = None) -> TinySRModel:
        path = Path(path)
        if not (path / "unet").is_dir():
            raise WeightsError(
                f"{str(path)!r} is not a saved tiny model (no unet/ folder); create one with "
                "`python pipelines/pretrain.py` or set model.pretrained to an exported model"
            )
        info = json.loads((path / MODEL_INFO_FILE).read_text())
        unet = UNet2DModel.from_pretrained(path / "unet")
        # `sampler` None: the scheduler the folder saved (a sampler=ddpm model reloads as DDPM).
        saved = DDIMScheduler.load_config(path / "scheduler").get("_class_name")
        name = sampler or ("ddpm" if saved == "DDPMScheduler" else "ddim")
        scheduler = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}[name].from_pretrained(
            path / "scheduler"
        )
        # Exports from before `residual` existed predict x0 directly.
        return cls(unet, scheduler, int(info["scale"]), bool(info.get("residual", False)))


def build_tiny(cfg: ModelConfig, scale: int) -> TinySRModel:
    """A tiny model from `cfg.pretrained`, or freshly initialised from `cfg.tiny`."""
    if cfg.pretrained:
        model = TinySRModel.from_pretrained(cfg.pretrained, cfg.sampler)
        if model.scale != scale:
            raise WeightsError(
                f"model.pretrained={cfg.pretrained!r} is a x{model.scale} model but data.scale="
                f"{scale}; set data.scale={model.scale} or use a x{scale} model"
            )
        return model
    check_residual(cfg.tiny.residual, cfg.tiny.prediction_type)
    scheduler = build_scheduler(cfg.tiny, cfg.sampler)
    return TinySRModel(build_unet(cfg.tiny), scheduler, scale, cfg.tiny.residual)
