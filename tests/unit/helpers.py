"""Builders several unit test modules share (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from rfsr_ray.config import RFSRConfig, build_config
from rfsr_ray.train.step import Batch


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------ tiny pixel-space model
def tiny_config(**sections: dict) -> RFSRConfig:
    """The tiny pixel-space x4 model on 32 px patches, 8 inference steps, all three RFSR losses;
    `sections` are merged one level deep (`train={"lr": 1e-4}` keeps the other train keys)."""
    tree = {
        "data": {"patch_size": 32},
        "model": {"tiny": {"block_out_channels": [16, 32], "norm_num_groups": 8}},
        "schedule": {"num_inference_steps": 8},
        "losses": {
            "structure": {"window": [0, 2], "weight": 1.0},
            "reward": {"window": [5, 7], "terms": [{"name": "gmsd", "weight": 0.1}]},
            "gram": {"window": [6, 7], "weight": 1.0, "allow_random_vgg": True},
        },
        "train": {"lr": 1e-3, "grad_accum": 1, "ema_decay": 0.9},
    }
    for key, value in sections.items():
        for sub, sub_value in value.items():
            if isinstance(sub_value, dict):
                tree.setdefault(key, {}).setdefault(sub, {}).update(sub_value)
            else:
                tree.setdefault(key, {})[sub] = sub_value
    return build_config(tree)


def fixed_batch(size: int = 32, seed: int = 0) -> Batch:
    """Two smooth HR images (2, 3, size, size) in [0, 1] and their x4 area-downsampled LR."""
    generator = seeded(seed)
    coarse = torch.rand(2, 3, size // 8, size // 8, generator=generator)
    hr = F.interpolate(coarse, size=(size, size), mode="bicubic").clamp(0, 1)
    return Batch(F.interpolate(hr, scale_factor=0.25, mode="area"), hr)


# ------------------------------------------------------------------ tiny latent families
def latent_config(
    folders: dict[str, Path], family: str, train: dict | None = None, **model: object
) -> RFSRConfig:
    """`family` on the tiny components in `folders[family]` (the `folders` fixture), 4 inference
    steps, all three RFSR losses; `model` keys go to the model section."""
    return build_config(
        {
            "model": {"family": family, "pretrained": str(folders[family]), **model},
            "schedule": {"num_inference_steps": 4},
            "losses": {
                "structure": {"window": [0, 1], "weight": 1.0},
                "reward": {"window": [2, 3], "terms": [{"name": "gmsd", "weight": 1.0}]},
                "gram": {"window": [2, 3], "allow_random_vgg": True, "weight": 1.0},
            },
            "train": {"lr": 1e-3, "batch_size": 2, **(train or {})},
        }
    )


def pair(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """An LR (2, 3, 8, 8) and HR (2, 3, 32, 32) pair in [0, 1]; LR is the HR area-downsampled."""
    hr = torch.rand(2, 3, 32, 32, generator=seeded(seed))
    return F.interpolate(hr, scale_factor=0.25, mode="area"), hr
