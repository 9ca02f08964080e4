"""Fixtures shared by the integration tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rfsr_ray.config import build_config
from rfsr_ray.models import build_model


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> Path:
    """A tiny randomly initialised x4 model saved like a pretrain export."""
    cfg = build_config(
        {"model": {"tiny": {"block_out_channels": [16, 32], "prediction_type": "sample"}}}
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("base") / "tiny_x4"
    build_model(cfg.model, 4).save(path)
    return path
