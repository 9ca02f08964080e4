"""diffusers' `LDMSuperResolutionPipeline` as an rfsr_ray plug-in model family (`ldm_sr`).

The model (`CompVis/ldm-super-resolution-4x-openimages`): a VQ autoencoder whose latent has the
LR image's size and channel count, and a `UNet2DModel` that denoises that latent from
[x_t, LR] (6 channels). No text, no guidance. Sampling follows the pipeline call for call and
draw for draw — x_T = randn((B, 3, h, w)) · init_noise_sigma, the concatenated input through
`scale_model_input`, `scheduler.step(…, eta)`, the VQ decode — so `sample` reproduces it.

What RFSR adds to the pipeline: x̂0 at any step (`predict_x0`, in the scheduler's prediction
type), a differentiable decode, the frozen original UNet (`reference=True`) and the standard
objective on the VQ encoder's latent of the HR image (`denoise_loss`).
"""

from __future__ import annotations

import copy
import inspect
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    LDMSuperResolutionPipeline,
    SchedulerMixin,
    UNet2DModel,
    VQModel,
)
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from rfsr_ray.config import MemoryConfig, ModelConfig, PromptConfig
from rfsr_ray.errors import ConfigError, WeightsError
from rfsr_ray.hub import looks_local, resolve
from rfsr_ray.models.diffusion import (
    checked_timesteps,
    denoise_target,
    is_variance_preserving,
    sample_sr,
    x0_from_model_output,
)
from rfsr_ray.models.wrapping import TrainableWrappers

from .options import LDMSROptions, parse_options

FINETUNE_CHOICES = ("full",)  # None means "full": the whole UNet trains
SAMPLERS: dict[str, type[SchedulerMixin]] = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}
PIPELINE_FILES = ("model_index.json", "unet", "vqvae", "scheduler")
HOW_TO_GET_ONE = (
    "write the tiny base with `python examples/ldm_sr/make_tiny.py --out DIR`, or download the "
    "released model (`huggingface-cli download CompVis/ldm-super-resolution-4x-openimages "
    "--local-dir DIR`), and set model.pretrained=DIR"
)


class LDMSRModel(TrainableWrappers, nn.Module):
    """Implements rfsr_ray's `ISRDiffusionModel` for an LDM super-resolution pipeline.

    unet: [x_t, LR in [-1, 1]] (B, C + 3, h, w) → (B, C, h, w) in the scheduler's parameterisation.
    vqvae: latent (B, C, h, w) ↔ image (B, 3, h·scale, w·scale) in [-1, 1]; always frozen.
    trainable: the whole UNet trains and a frozen copy is the reference; False = inference only.
    """

    family = "ldm_sr"

    def __init__(
        self,
        unet: UNet2DModel,
        vqvae: VQModel,
        scheduler: SchedulerMixin,
        options: LDMSROptions,
        trainable: bool = True,
    ) -> None:
        super().__init__()
        self.unet, self.vqvae, self.scheduler, self.options = unet, vqvae, scheduler, options
        self.scale = vq_scale(vqvae)
        self.vqvae.requires_grad_(False).eval()
        self.unet.requires_grad_(trainable)
        # The Gram regulariser's frozen original: a copy taken before any update. Inference
        # builds skip it: nothing trains there, so the UNet is its own original.
        self.reference_unet = (
            copy.deepcopy(unet).requires_grad_(False).eval() if trainable else None
        )

    # ------------------------------------------------------------------ parameters
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.unet.parameters() if p.requires_grad]

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"unet": self.unet} if self.trainable_parameters() else {}

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def train(self, mode: bool = True) -> LDMSRModel:
        super().train(mode)
        self.vqvae.eval()  # frozen parts never leave eval mode
        if self.reference_unet is not None:
            self.reference_unet.eval()
        return self

    # ------------------------------------------------------------------ sampling pieces
    def condition(
        self,
        lr_image: torch.Tensor,
        generator: torch.Generator | None = None,
        prompts: list[str] | None = None,
        mode: Literal["train", "denoise", "sample"] = "sample",
    ) -> torch.Tensor:
        """LR (B, 3, h, w) in [0, 1] → the pipeline's `image`, (B, 3, h, w) in [-1, 1]. The
        model has no text and no guidance, so `generator`, `prompts` and `mode` change nothing."""
        return (lr_image * 2 - 1).to(self.device, self.unet.dtype)

    def start_latent(
        self, condition: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        """x_T: (B, C, h, w) noise at the LR size, drawn as the pipeline draws it."""
        batch, _, height, width = condition.shape
        shape = (batch, self.unet.config.in_channels // 2, height, width)
        noise = randn_tensor(
            shape, generator=generator, device=condition.device, dtype=condition.dtype
        )
        return noise * self.scheduler.init_noise_sigma

    def set_timesteps(self, num_inference_steps: int) -> torch.Tensor:
        return checked_timesteps(self.scheduler, num_inference_steps, self.device)

    def _denoiser(self, reference: bool) -> nn.Module:
        if not reference:
            return self.forward_module("unet")  # the DDP wrapper while training
        return self.reference_unet if self.reference_unet is not None else self.unet

    def model_output(
        self,
        latent: torch.Tensor,
        timestep: torch.Tensor,
        condition: torch.Tensor,
        reference: bool = False,
    ) -> torch.Tensor:
        """The UNet's output (ε, v or x0, per the scheduler) for x_t (B, C, h, w) at `timestep`."""
        inputs = torch.cat([latent, condition.to(latent.dtype)], dim=1)
        # As the pipeline: the scheduler scales the concatenated input (DDIM/DDPM: unchanged).
        inputs = self.scheduler.scale_model_input(inputs, timestep)
        return self._denoiser(reference)(inputs, timestep).sample

    def _step_kwargs(self, generator: torch.Generator | None) -> dict[str, Any]:
        # As the pipeline: η (and our generator) go only to schedulers whose step takes them.
        accepted = inspect.signature(self.scheduler.step).parameters
        kwargs = {"eta": self.options.eta, "generator": generator}
        return {name: value for name, value in kwargs.items() if name in accepted}

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
        step = self.scheduler.step(output, timestep, latent, **self._step_kwargs(generator))
        return step.prev_sample

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
        """Latent (B, C, h, w) → SR (B, 3, h·scale, w·scale) in [0, 1], differentiable (the VQ
        codebook lookup passes gradients straight through to the latent)."""
        decoded = self.vqvae.decode(latent, force_not_quantize=not self.options.quantize)
        image = (decoded.sample + 1) / 2
        # The pipeline's clamp in value, but straight-through (as rfsr_ray's own families):
        # out-of-range pixels keep their gradient, so losses can pull a wild x̂0 back.
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
        """LDM's objective: the MSE of the UNet output against ε (or v, or x0) on the VQ
        encoder's latent of HR (B, 3, H, W) in [0, 1], before quantisation as LDM trains."""
        with torch.no_grad():
            clean = self.vqvae.encode(hr_image * 2 - 1).latents
        noise = randn_tensor(
            clean.shape, generator=generator, device=clean.device, dtype=clean.dtype
        )
        # Drawn where the generator lives (a CPU generator cannot fill a CUDA tensor).
        where = generator.device if generator is not None else torch.device("cpu")
        steps = self.scheduler.config.num_train_timesteps
        timestep = torch.randint(0, steps, (clean.shape[0],), generator=generator, device=where)
        timestep = timestep.to(clean.device)
        noisy = self.scheduler.add_noise(clean, noise, timestep)
        output = self.model_output(noisy, timestep, self.condition(lr_image))
        target = denoise_target(self.scheduler, clean, noise, timestep)
        return F.mse_loss(output.float(), target.float())

    # ------------------------------------------------------------------ persistence
    def pipeline(self) -> LDMSuperResolutionPipeline:
        """The diffusers pipeline over this model's parts (the plain, trained UNet)."""
        return LDMSuperResolutionPipeline(
            vqvae=self.vqvae, unet=self.unet, scheduler=self.scheduler
        )

    def save(self, path: str | Path) -> Path:
        """A pipeline folder that `build` (model.pretrained=path) and diffusers' own
        `LDMSuperResolutionPipeline.from_pretrained` load; rfsr_ray adds rfsr_model.json."""
        path = Path(path)
        self.pipeline().save_pretrained(path, safe_serialization=True)
        return path


def vq_scale(vqvae: VQModel) -> int:
    """The autoencoder's upsampling factor: every encoder level but the last halves the size."""
    return 2 ** (len(vqvae.config.down_block_types) - 1)


# ---------------------------------------------------------------------- the builder
def build(cfg: ModelConfig, scale: int, trainable: bool = True) -> LDMSRModel:
    """rfsr_ray's entry point (`model.builder: ldm_sr_family:build`): the pipeline folder (or
    hub id) `cfg.pretrained` as a x`scale` model; `trainable=False` loads for inference only."""
    options = parse_options(cfg.options)
    check_finetune(cfg.finetune)
    check_unused_settings(cfg.prompt, cfg.memory)
    pipeline = load_pipeline(cfg.pretrained, cfg.revision)
    check_scale(pipeline.vqvae, scale, cfg.pretrained)
    scheduler = choose_scheduler(pipeline.scheduler, cfg.sampler)
    apply_memory_settings(pipeline, cfg.memory)
    return LDMSRModel(pipeline.unet, pipeline.vqvae, scheduler, options, trainable)


def load_pipeline(source: str | None, revision: str | None) -> LDMSuperResolutionPipeline:
    """The saved pipeline at `source`, or a `WeightsError` naming it and how to make one."""
    if not source:
        raise WeightsError(
            "model.pretrained is not set; the ldm_sr family loads a saved "
            "LDMSuperResolutionPipeline folder: " + HOW_TO_GET_ONE
        )
    # A hub id is exactly `owner/name`; any other string (a relative folder not written yet,
    # `outputs/base/x`) is a folder, so it gets this message rather than a hub lookup.
    if looks_local(source) or source.count("/") != 1:
        folder = Path(source).expanduser()
        if not folder.is_dir():
            raise WeightsError(f"model.pretrained={source!r}: no such folder; " + HOW_TO_GET_ONE)
    else:
        folder = resolve(source, revision, "model.pretrained")  # the HF cache, or a download
    missing = [name for name in PIPELINE_FILES if not (folder / name).exists()]
    if missing:
        raise WeightsError(
            f"model.pretrained={source!r} lacks {missing}; it must be an "
            f"LDMSuperResolutionPipeline folder written by save_pretrained: " + HOW_TO_GET_ONE
        )
    # Component by component: the pipeline's from_pretrained draws a "Loading pipeline
    # components" progress bar in every Ray worker.
    return LDMSuperResolutionPipeline(
        vqvae=VQModel.from_pretrained(folder / "vqvae"),
        unet=UNet2DModel.from_pretrained(folder / "unet"),
        scheduler=load_scheduler(folder / "scheduler"),
    )


def load_scheduler(folder: Path) -> SchedulerMixin:
    """The scheduler class the folder's config names (DDIM for the released model)."""
    import diffusers

    config = DDIMScheduler.load_config(folder)  # ConfigMixin: reads any scheduler config
    return getattr(diffusers, config["_class_name"]).from_config(config)


def check_scale(vqvae: VQModel, scale: int, source: str | None) -> None:
    """The autoencoder's factor must be `data.scale`: the LR size is the latent size."""
    factor = vq_scale(vqvae)
    if factor != scale:
        raise WeightsError(
            f"model.pretrained={source!r} is a x{factor} model (its VQ autoencoder upsamples "
            f"x{factor}) but data.scale={scale}; set data.scale={factor} or use a x{scale} model"
        )


def choose_scheduler(scheduler: SchedulerMixin, sampler: str | None) -> SchedulerMixin:
    """The folder's own scheduler, or (`model.sampler`) DDIM/DDPM rebuilt from its config."""
    if sampler is not None:
        scheduler = SAMPLERS[sampler].from_config(scheduler.config)
    if not is_variance_preserving(scheduler):
        raise ConfigError(
            f"model.pretrained's scheduler is {type(scheduler).__name__}, a sigma-space sampler "
            "whose x_t RFSR's x̂0 does not support; set model.sampler=ddim (or ddpm)"
        )
    return scheduler


def check_finetune(finetune: str | None) -> None:
    """Only the whole UNet trains; LoRA needs `add_adapter`, which UNet2DModel lacks."""
    if finetune is None or finetune in FINETUNE_CHOICES:
        return
    if finetune == "lora":
        raise ConfigError(
            "model.finetune=lora is not available for the ldm_sr family: diffusers' UNet2DModel "
            "has no add_adapter (it is not a PeftAdapterMixin), which rfsr_ray's LoRA uses; set "
            "model.finetune=full and model.lora.enabled=false"
        )
    raise ConfigError(
        f"model.finetune={finetune!r} is not available for the ldm_sr family; use one of "
        f"{list(FINETUNE_CHOICES)} (or leave it unset: full)"
    )


def check_unused_settings(prompt: PromptConfig, memory: MemoryConfig) -> None:
    """Refuse settings this family cannot honour instead of silently ignoring them."""
    if prompt != PromptConfig():
        raise ConfigError(
            "model.prompt is set, but the ldm_sr family has no text input or guidance; remove "
            "model.prompt from the config"
        )
    for name in ("vae_slicing", "vae_tiling", "free_text_encoder"):
        if getattr(memory, name):
            raise ConfigError(
                f"model.memory.{name}=true is not available for the ldm_sr family (a VQModel has "
                "no slicing or tiling, and there is no text encoder); set it false"
            )


def apply_memory_settings(pipeline: LDMSuperResolutionPipeline, memory: MemoryConfig) -> None:
    """`model.memory`: gradient checkpointing of the UNet (the VQModel has none), channels-last."""
    if memory.gradient_checkpointing:
        pipeline.unet.enable_gradient_checkpointing()
    if memory.channels_last:
        for module in (pipeline.unet, pipeline.vqvae):
            module.to(memory_format=torch.channels_last)
