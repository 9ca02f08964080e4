"""Fixtures shared by the unit tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from rfsr_ray.testing.tiny_components import save_tiny_components


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Tiny random components of each latent family, saved as diffusers folders."""
    root = tmp_path_factory.mktemp("components")
    return {
        family: save_tiny_components(family, root / family)
        for family in ("sd_upscaler", "controlnet_sr")
    }
