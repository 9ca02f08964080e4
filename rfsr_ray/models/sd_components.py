"""Loading Stable Diffusion components from a local diffusers folder (hub ids are resolved to
one by `rfsr_ray.models.hub` first), so loading never reaches for the network."""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, SchedulerMixin
from torch import nn

from rfsr_ray.errors import WeightsError
from rfsr_ray.models.hub import require_component


def load_scheduler(folder: Path, sampler: str | None) -> SchedulerMixin:
    """The scheduler saved in `folder` (its own class), or DDIM/DDPM built from its config."""
    config_file = folder / "scheduler_config.json"
    if not config_file.is_file():
        raise WeightsError(f"{folder} has no scheduler_config.json; not a diffusers scheduler")
    name = json.loads(config_file.read_text()).get("_class_name", "DDIMScheduler")
    scheduler_cls = getattr(diffusers, name, None)
    if scheduler_cls is None:
        raise WeightsError(f"{config_file} names unknown scheduler class {name!r}")
    scheduler = scheduler_cls.from_pretrained(folder)
    if sampler == "ddim":
        return DDIMScheduler.from_config(scheduler.config)
    if sampler == "ddpm":
        return DDPMScheduler.from_config(scheduler.config)
    return scheduler


def load_text_parts(folder: Path, key: str) -> tuple[nn.Module, object]:
    from transformers import CLIPTextModel, CLIPTokenizer

    text_encoder = CLIPTextModel.from_pretrained(
        require_component(folder, "text_encoder", key), local_files_only=True
    )
    tokenizer = CLIPTokenizer.from_pretrained(
        require_component(folder, "tokenizer", key), local_files_only=True
    )
    return text_encoder, tokenizer


def load_vae(folder: Path, key: str) -> AutoencoderKL:
    return AutoencoderKL.from_pretrained(
        require_component(folder, "vae", key), local_files_only=True
    )


def load_unet(folder: Path, key: str) -> nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(
        require_component(folder, "unet", key), local_files_only=True
    )
