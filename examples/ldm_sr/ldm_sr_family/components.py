"""A tiny, randomly initialised LDM super-resolution model with the released one's layout.

The parts follow `CompVis/ldm-super-resolution-4x-openimages` (a `UNet2DModel` on the latent
concatenated with the LR image, a 3-level x4 `VQModel`, DDIM) at the sizes of diffusers' own
`LDMSuperResolutionPipeline` fast tests, so the whole family runs on a CPU in seconds. It is
saved as a diffusers pipeline folder: it loads through exactly the path real weights take.
Its outputs are noise; it exists for tests and smoke runs.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDIMScheduler, LDMSuperResolutionPipeline, UNet2DModel, VQModel

# The released model's noise schedule: the original LDM bsr_sr config trains with
# linear_start=0.0015, linear_end=0.0155 over 1000 steps, and LDM's "linear" schedule (betas
# linear in sqrt) is diffusers' "scaled_linear"; ε-prediction and no x̂0 clipping as in LDM.
# A real snapshot brings its own scheduler/scheduler_config.json; this only shapes the tiny one.
RELEASED_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0015,
    "beta_end": 0.0155,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
}
LATENT_CHANNELS = 3  # the VQ latent has as many channels as the RGB LR it is concatenated with
VQ_LEVELS = 3  # each encoder level but the last halves the size: 2 ** (3 - 1) = x4


def tiny_unet() -> UNet2DModel:
    """The denoiser: (B, 6, h, w) = [x_t, LR] → ε (B, 3, h, w); attention at the lower level
    as in the released UNet."""
    return UNet2DModel(
        sample_size=8,
        in_channels=2 * LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    )


def tiny_vqvae() -> VQModel:
    """The autoencoder: image (B, 3, 4h, 4w) in [-1, 1] ↔ latent (B, 3, h, w)."""
    return VQModel(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        latent_channels=LATENT_CHANNELS,
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        norm_num_groups=8,
        num_vq_embeddings=32,
        down_block_types=("DownEncoderBlock2D",) * VQ_LEVELS,
        up_block_types=("UpDecoderBlock2D",) * VQ_LEVELS,
    )


def tiny_ldm_sr(seed: int = 0) -> LDMSuperResolutionPipeline:
    """The tiny pipeline; `seed` fixes every initial weight."""
    torch.manual_seed(seed)
    return LDMSuperResolutionPipeline(
        vqvae=tiny_vqvae(), unet=tiny_unet(), scheduler=DDIMScheduler(**RELEASED_SCHEDULER)
    )


def save_tiny_ldm_sr(folder: str | Path, seed: int = 0) -> Path:
    """Write the tiny pipeline to `folder` (model_index.json, unet/, vqvae/, scheduler/)."""
    folder = Path(folder)
    tiny_ldm_sr(seed).save_pretrained(folder, safe_serialization=True)
    return folder
