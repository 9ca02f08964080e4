"""Make `import ldm_sr_family` work as rfsr_ray makes it work (model.py_modules puts the
package's parent folder on sys.path), and write the tiny base model once per session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1]  # examples/ldm_sr
sys.path.insert(0, str(EXAMPLE))

from ldm_sr_family import save_tiny_ldm_sr  # noqa: E402


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny LDMSuperResolutionPipeline (x4; LR 8² → SR 32²)."""
    return save_tiny_ldm_sr(tmp_path_factory.mktemp("ldm_sr") / "base", seed=0)
