"""Fixtures shared by the integration tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rfsr_ray.config import build_config
from rfsr_ray.models import build_model


def save_tiny_model(folder: Path, seed: int) -> Path:
    """A tiny randomly initialised x4 model saved like a pretrain export, in `folder/tiny_x4`."""
    cfg = build_config(
        {"model": {"tiny": {"block_out_channels": [16, 32], "prediction_type": "sample"}}}
    )
    torch.manual_seed(seed)
    path = folder / "tiny_x4"
    build_model(cfg.model, 4).save(path)
    return path


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("base"), seed=0)
