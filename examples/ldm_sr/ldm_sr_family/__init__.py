"""diffusers' LDMSuperResolutionPipeline (CompVis/ldm-super-resolution-4x-openimages) as an
rfsr_ray plug-in model family:

    model: {family: plugin, builder: "ldm_sr_family:build", options: {eta: 0.0}}
"""

from __future__ import annotations

from .components import save_tiny_ldm_sr, tiny_ldm_sr
from .model import LDMSRModel, build
from .options import LDMSROptions, parse_options

__all__ = [
    "LDMSRModel",
    "LDMSROptions",
    "build",
    "parse_options",
    "save_tiny_ldm_sr",
    "tiny_ldm_sr",
]
