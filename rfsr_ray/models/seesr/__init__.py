"""SeeSR's UNet and ControlNet (github.com/cswry/SeeSR): Stable Diffusion 2 with image
cross-attention to RAM/DAPE embeddings of the LR input, on diffusers' classes."""

from __future__ import annotations

from rfsr_ray.models.seesr.controlnet import SeeSRControlNet, load_seesr_controlnet
from rfsr_ray.models.seesr.unet import IMAGE_EMBED_DIM, SeeSRUNet, load_seesr_unet

__all__ = [
    "IMAGE_EMBED_DIM",
    "SeeSRControlNet",
    "SeeSRUNet",
    "load_seesr_controlnet",
    "load_seesr_unet",
]
