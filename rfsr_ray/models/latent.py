"""What the Stable-Diffusion-based families share: text conditioning, classifier-free guidance,
the VAE, the frozen reference, what trains (full, attention blocks or LoRA) and memory features.

Each family (`sd_upscaler`, `controlnet_sr`) adds how the LR image conditions the denoiser, how
x_T is drawn and how it is exported. Sampling follows the matching diffusers pipeline call for
call and draw for draw (same generator order), so a family's `sample` reproduces the pipeline.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, SchedulerMixin
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from rfsr_ray.config import ModelConfig, PromptConfig
from rfsr_ray.errors import ConfigError
from rfsr_ray.models.diffusion import (
    checked_timesteps,
    denoise_target,
    sample_sr,
    x0_from_model_output,
)
from rfsr_ray.models.lora import adapters_disabled, add_lora
from rfsr_ray.models.tiny import MODEL_INFO_FILE
from rfsr_ray.models.wrapping import TrainableWrappers

# train: RFSR training (prompt dropout, the training guidance); denoise: the standard objective
# (prompt dropout, never guided); sample: validation and inference (guidance_scale).
Mode = Literal["train", "denoise", "sample"]


@dataclass(frozen=True)
class LatentCondition:
    """Everything the denoiser needs besides the latent, built once per batch.

    With guidance (`guidance_scale` > 1) the tensors hold [negative; positive] halves, 2B rows,
    exactly as the diffusers pipelines batch them.
    """

    batch_size: int
    prompt_embeds: torch.Tensor  # (B or 2B, L, D)
    image: torch.Tensor  # family-specific conditioning image (B or 2B, 3, h, w)
    guidance_scale: float = 1.0
    noise_level: torch.Tensor | None = None  # (B or 2B,) long, sd_upscaler
    control: torch.Tensor | None = None  # (B, 3, H, W) in [0, 1], controlnet_sr and seesr
    image_embeds: torch.Tensor | None = None  # (B or 2B, N, 512) tagger embeddings, seesr

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1.0


def attention_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Parameters of the transformer (self/cross-attention) blocks of a UNet or ControlNet."""
    found: dict[int, nn.Parameter] = {}
    for sub in module.modules():
        if isinstance(sub, Transformer2DModel):
            found.update({id(p): p for p in sub.parameters()})
    return list(found.values())


def guidance_for(settings: PromptConfig, mode: Mode) -> float:
    """The classifier-free guidance scale of each use. RFSR training rolls out and predicts x̂0
    with the guidance users sample with (`train_guidance_scale`, default `guidance_scale`), so
    the trained trajectory is the one inference runs; the denoising objective is never guided."""
    if mode == "sample":
        return settings.guidance_scale
    if mode == "train":
        train = settings.train_guidance_scale
        return settings.guidance_scale if train is None else train
    return 1.0


def check_scheduler(scheduler: SchedulerMixin) -> None:
    """x̂0 is computed in the variance-preserving parameterisation (x_t = √ᾱ·x0 + √(1−ᾱ)·ε);
    sigma-space samplers (Euler, Heun, LMS: init_noise_sigma ≠ 1) scale x_t differently."""
    if not hasattr(scheduler, "alphas_cumprod") or float(scheduler.init_noise_sigma) != 1.0:
        raise ConfigError(
            f"scheduler {type(scheduler).__name__} is a sigma-space sampler, which RFSR's x̂0 "
            "does not support; set model.sampler=ddim (or ddpm)"
        )


class FrozenOriginal(nn.Module):
    """Frozen copies of the tensors of a module that train: the Gram regulariser's original,
    swapped into the module for a reference forward. The module's other weights never change,
    so copying them too would only cost memory (all of SD 2's UNet, 3.5 GB, when only its
    attention blocks train). Buffers (not saved in state dicts) so `.to()` moves them."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.names = [name for name, p in module.named_parameters() if p.requires_grad]
        for index, name in enumerate(self.names):
            original = module.get_parameter(name).detach().clone()
            self.register_buffer(f"tensor_{index}", original, persistent=False)

    @contextlib.contextmanager
    def swapped_into(self, module: nn.Module) -> Iterator[nn.Module]:
        """`module` computing with the original tensors, without gradient; the trained ones
        are back in place when the block ends (before any backward pass needs them)."""
        parameters = [module.get_parameter(name) for name in self.names]
        trained = [parameter.data for parameter in parameters]
        with torch.no_grad():
            try:
                for parameter, original in zip(parameters, self.buffers(), strict=True):
                    parameter.data = original
                yield module
            finally:
                for parameter, data in zip(parameters, trained, strict=True):
                    parameter.data = data


class LatentSRModel(TrainableWrappers, nn.Module):
    """Base of the latent families; implements `ISRDiffusionModel` with a family's hooks."""

    family: str = ""
    trainable_names: tuple[str, ...] = ("unet",)

    def __init__(
        self,
        unet: nn.Module,
        vae: AutoencoderKL,
        text_encoder: nn.Module,
        tokenizer: object,
        scheduler: SchedulerMixin,
        cfg: ModelConfig,
        scale: int,
        controlnet: nn.Module | None = None,
        trainable: bool = True,
    ) -> None:
        super().__init__()
        check_scheduler(scheduler)
        self.unet, self.vae, self.text_encoder, self.controlnet = (
            unet,
            vae,
            text_encoder,
            controlnet,
        )
        self.tokenizer, self.scheduler, self.cfg, self.scale = tokenizer, scheduler, cfg, scale
        for module in self.components().values():
            module.requires_grad_(False).eval()
        self.reference = nn.ModuleDict()  # FrozenOriginal per trained module (not LoRA)
        if trainable:  # inference loads skip adapters, copies and gradients
            self._select_trainable()
        self._memory_features()
        self._prompt_cache: dict[tuple[str, str], torch.Tensor] = {}
        self.fixed_prompts: PromptTable | None = None
        if trainable and cfg.memory.free_text_encoder:
            self._free_text_encoder()

    # ------------------------------------------------------------------ what trains
    def components(self) -> dict[str, nn.Module]:
        parts = {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder}
        if self.controlnet is not None:
            parts["controlnet"] = self.controlnet
        return {name: module for name, module in parts.items() if module is not None}

    def _select_trainable(self) -> None:
        mode, lora = self.cfg.finetune_mode, self.cfg.lora
        if mode == "lora":
            for name in lora.apply_to:
                add_lora(self.components()[name], lora, f"{self.family} {name}")
            return
        for part in mode.split("+"):
            for parameter in self.part_parameters(part):
                parameter.requires_grad_(True)
        # The Gram regulariser's frozen original: copies of only the tensors that change.
        for name in self.trained_module_names():
            self.reference[name] = FrozenOriginal(self.components()[name])
        if not self.trainable_parameters():
            raise ConfigError(f"model.finetune={mode!r} selects no parameters of this model")

    def part_parameters(self, part: str) -> list[nn.Parameter]:
        """The parameters one `+`-separated part of `model.finetune` names."""
        if part in ("unet", "controlnet"):
            return list(self.components()[part].parameters())
        if part == "unet_attention":
            return attention_parameters(self.unet)
        raise AssertionError(part)  # unreachable: the schema limits `finetune` per family

    def trained_module_names(self) -> list[str]:
        return [
            name
            for name, module in self.components().items()
            if any(p.requires_grad for p in module.parameters())
        ]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [
            p for name in self.trained_module_names() for p in self.components()[name].parameters()
            if p.requires_grad
        ]  # fmt: skip

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {name: self.components()[name] for name in self.trained_module_names()}

    def train(self, mode: bool = True) -> LatentSRModel:
        super().train(mode)
        for name, module in self.components().items():  # frozen parts never leave eval mode
            if name not in self.trained_module_names():
                module.eval()
        self.reference.eval()
        return self

    def _memory_features(self) -> None:
        memory = self.cfg.memory
        if memory.gradient_checkpointing:
            # Frozen parts on the gradient path (the UNet under a trained ControlNet, the VAE
            # decoder) hold activations too; diffusers checkpoints non-reentrantly (DDP-safe).
            for module in (self.unet, self.controlnet, self.vae):
                if module is not None:
                    module.enable_gradient_checkpointing()
        if memory.channels_last:
            for module in (self.unet, self.controlnet, self.vae):
                if module is not None:
                    module.to(memory_format=torch.channels_last)
        if memory.vae_slicing:
            self.vae.enable_slicing()
        if memory.vae_tiling:
            self.vae.enable_tiling()

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    # ------------------------------------------------------------------ text
    def _free_text_encoder(self) -> None:
        """`model.memory.free_text_encoder`: encode every prompt a fixed-prompt run uses (the
        text, '' for prompt dropout, the negative for guidance), keep those embeddings and drop
        the encoder (1.4 GB for SD 2's). An export reloads it from `model.pretrained`."""
        settings = self.cfg.prompt
        texts = sorted({settings.text, "", settings.negative})
        self.fixed_prompts = PromptTable(texts, self.encode_prompts(texts))
        self._prompt_cache.clear()
        self.text_encoder = None

    @torch.no_grad()
    def encode_prompts(self, texts: list[str]) -> torch.Tensor:
        """(B, L, D) text embeddings, as `StableDiffusionPipeline.encode_prompt` makes them;
        cached per text (the encoder is frozen)."""
        if self.text_encoder is None:
            assert self.fixed_prompts is not None  # set when the encoder is freed
            return self.fixed_prompts.lookup(texts)
        device = self.device
        missing = sorted({t for t in texts if (t, str(device)) not in self._prompt_cache})
        if missing:
            tokens = self.tokenizer(
                missing,
                padding="max_length",
                max_length=self.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            )
            mask = None
            if getattr(self.text_encoder.config, "use_attention_mask", False):
                mask = tokens.attention_mask.to(device)
            embeds = self.text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]
            for text, embed in zip(missing, embeds, strict=True):
                self._prompt_cache[(text, str(device))] = embed
        return torch.stack([self._prompt_cache[(t, str(device))] for t in texts])

    def prompt_embeds(
        self,
        prompts: list[str] | None,
        batch_size: int,
        generator: torch.Generator | None,
        mode: Mode,
    ) -> tuple[torch.Tensor, float]:
        """Embeddings for the batch (fixed text unless per-sample `prompts` are given; dropped
        to '' with `prompt.drop_prob` in training) and the guidance scale to sample with."""
        settings = self.cfg.prompt
        texts = list(prompts) if prompts is not None else [settings.text] * batch_size
        if mode != "sample" and settings.drop_prob > 0:
            draws = torch.rand(len(texts), generator=generator, device=_generator_device(generator))
            dropped = (draws < settings.drop_prob).tolist()
            texts = ["" if drop else text for drop, text in zip(dropped, texts, strict=True)]
        embeds = self.encode_prompts(texts)
        guidance = guidance_for(settings, mode)
        if guidance > 1.0:
            embeds = torch.cat([self.encode_prompts([settings.negative] * batch_size), embeds])
        return embeds, guidance

    # ------------------------------------------------------------------ family hooks
    def condition(
        self,
        lr_image: torch.Tensor,
        generator: torch.Generator | None = None,
        prompts: list[str] | None = None,
        mode: Mode = "sample",
    ) -> LatentCondition:
        raise NotImplementedError

    def start_latent(
        self, condition: LatentCondition, generator: torch.Generator | None
    ) -> torch.Tensor:
        raise NotImplementedError

    def _denoise(
        self,
        latent_input: torch.Tensor,
        timestep: torch.Tensor,
        condition: LatentCondition,
        unet: nn.Module,
        controlnet: nn.Module | None,
    ) -> torch.Tensor:
        raise NotImplementedError

    def pipeline(self, merged: bool = True) -> object:
        """The matching diffusers pipeline over this model's components."""
        raise NotImplementedError

    # ------------------------------------------------------------------ denoiser
    @contextlib.contextmanager
    def _denoisers(self, reference: bool) -> Iterator[tuple[nn.Module, nn.Module | None]]:
        """(unet, controlnet) to call: the trained ones (through their DDP wrappers while
        training), or the frozen original computed by the plain modules."""
        if not reference:
            yield self.forward_module("unet"), self.forward_module("controlnet")
        elif self.cfg.finetune_mode == "lora":  # the original = adapters switched off
            with adapters_disabled(self.unet, self.controlnet):
                yield self.unet, self.controlnet
        else:  # the trained tensors swapped for their frozen originals
            with contextlib.ExitStack() as stack:
                for name, original in self.reference.items():
                    stack.enter_context(original.swapped_into(self.components()[name]))
                yield self.unet, self.controlnet

    def model_output(
        self,
        latent: torch.Tensor,
        timestep: torch.Tensor,
        condition: LatentCondition,
        reference: bool = False,
    ) -> torch.Tensor:
        """The denoiser's output (ε or v) at `timestep`, with classifier-free guidance."""
        latent_input = torch.cat([latent] * 2) if condition.guided else latent
        latent_input = self.scheduler.scale_model_input(latent_input, timestep)
        with self._denoisers(reference) as (unet, controlnet):
            output = self._denoise(latent_input, timestep, condition, unet, controlnet)
        if condition.guided:
            uncond, cond = output.chunk(2)
            output = uncond + condition.guidance_scale * (cond - uncond)
        return output

    def set_timesteps(self, num_inference_steps: int) -> torch.Tensor:
        """The N sampler timesteps, noisiest first; refused unless N distinct and descending."""
        return checked_timesteps(self.scheduler, num_inference_steps, self.device)

    @torch.no_grad()
    def sampler_step(
        self,
        latent: torch.Tensor,
        timestep: torch.Tensor,
        condition: LatentCondition,
        generator: torch.Generator | None,
        reference: bool = False,
    ) -> torch.Tensor:
        output = self.model_output(latent, timestep, condition, reference)
        return self.scheduler.step(output, timestep, latent, generator=generator).prev_sample

    def predict_x0(
        self,
        latent: torch.Tensor,
        timestep: torch.Tensor,
        condition: LatentCondition,
        reference: bool = False,
    ) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not reference):
            output = self.model_output(latent, timestep, condition, reference)
            return x0_from_model_output(self.scheduler, output, timestep, latent)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Latent → (B, 3, H, W) in [0, 1] through the frozen VAE, differentiable."""
        config = self.vae.config
        latent = latent / config.scaling_factor
        if getattr(config, "shift_factor", None):
            latent = latent + config.shift_factor
        image = (self.vae.decode(latent, return_dict=False)[0] + 1) / 2
        # Straight-through clamp (as the tiny family): in range, gradient kept outside it.
        return image + (image.clamp(0, 1) - image).detach()

    @torch.no_grad()
    def encode(self, image: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] → a latent sample, scaled as the denoiser sees it."""
        posterior = self.vae.encode(image * 2 - 1).latent_dist
        return posterior.sample(generator) * self.vae.config.scaling_factor

    def sample(
        self,
        lr_image: torch.Tensor,
        num_inference_steps: int,
        generator: torch.Generator | None = None,
        reference: bool = False,
    ) -> torch.Tensor:
        return sample_sr(self, lr_image, num_inference_steps, generator, reference)

    def denoise_loss(
        self, hr_image: torch.Tensor, lr_image: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        """The v- or ε-MSE of the model's own training objective on the HR latent."""
        clean = self.encode(hr_image, generator)
        noise = randn_tensor(clean.shape, generator=generator, device=clean.device)
        steps = self.scheduler.config.num_train_timesteps
        timestep = torch.randint(
            0, steps, (clean.shape[0],), generator=generator, device=_generator_device(generator)
        ).to(clean.device)
        noisy = self.scheduler.add_noise(clean, noise, timestep)
        condition = self.condition(lr_image, generator, mode="denoise")
        output = self.model_output(noisy, timestep, condition)
        target = denoise_target(self.scheduler, clean, noise, timestep)
        return F.mse_loss(output.float(), target.float())

    # ------------------------------------------------------------------ export
    def info(self, export_format: str) -> dict:
        return {
            "family": self.family,
            "scale": self.scale,
            "format": export_format,
            "model_config": self.cfg.model_dump(mode="json"),
        }

    def save(self, path: str | Path) -> Path:
        """A diffusers pipeline folder (full, or LoRA merged) or LoRA adapters on the base."""
        path = Path(path)
        lora = self.cfg.finetune_mode == "lora"
        if lora and not self.cfg.lora.merge_on_export:
            self.save_lora(path)
            export_format = "lora"
        else:
            with self._text_encoder_loaded():
                self.pipeline(merged=True).save_pretrained(path, safe_serialization=True)
            export_format = "full"
        (path / MODEL_INFO_FILE).write_text(json.dumps(self.info(export_format), indent=2))
        return path

    def save_lora(self, path: Path) -> None:
        raise NotImplementedError

    @contextlib.contextmanager
    def _text_encoder_loaded(self) -> Iterator[None]:
        """The text encoder in place for a full export, reloaded from `model.pretrained` when
        `free_text_encoder` dropped it (it is frozen, so the base's is the trained model's)."""
        if self.text_encoder is not None:
            yield
            return
        from rfsr_ray.hub import resolve
        from rfsr_ray.models.sd_components import load_text_parts

        assert self.cfg.source is not None  # latent families always have one
        folder = resolve(self.cfg.source, self.cfg.revision, "model.pretrained")
        self.text_encoder = load_text_parts(folder, "model.pretrained")[0].requires_grad_(False)
        try:
            yield
        finally:
            self.text_encoder = None


class PromptTable(nn.Module):
    """Text embeddings of a fixed set of prompts, as buffers (they move with the model)."""

    def __init__(self, texts: list[str], embeds: torch.Tensor) -> None:
        super().__init__()
        self.texts = list(texts)
        self.register_buffer("embeds", embeds, persistent=False)  # (len(texts), L, D)

    def lookup(self, texts: list[str]) -> torch.Tensor:
        """(B, L, D) embeddings of `texts`, each one of the encoded prompts."""
        unknown = sorted(set(texts) - set(self.texts))
        if unknown:
            raise ConfigError(
                f"prompt(s) {unknown} were not encoded before model.memory.free_text_encoder "
                f"dropped the text encoder (encoded: {self.texts}); set "
                "model.memory.free_text_encoder=false to use other prompts"
            )
        return self.embeds[[self.texts.index(text) for text in texts]]


def _generator_device(generator: torch.Generator | None) -> str:
    return str(generator.device) if generator is not None else "cpu"


def full_export_config(cfg: ModelConfig, folder: Path) -> ModelConfig:
    """The config that reloads a full export: its own folder, nothing more to train on top."""
    from rfsr_ray.config import LoRAConfig

    return cfg.model_copy(
        update={
            "pretrained": str(folder),
            "revision": None,
            "finetune": None,
            "lora": LoRAConfig(),
            # the export holds its own controlnet/ folder
            "controlnet_sr": cfg.controlnet_sr.model_copy(update={"controlnet": None}),
            "seesr": cfg.seesr.model_copy(update={"weights": None}),
        }
    )
